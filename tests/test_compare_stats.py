"""The comparison table's statistics on fixed inputs: t quantiles, CIs, Welch's test, the rows."""

from __future__ import annotations

import math
import random

import pytest

from retrofit.compare import report, stats

# Welch's t-test, worked example 1 of Wikipedia's "Welch's t-test" article (two samples of 15):
# t = −2.46, ν = 24.99, p = 0.021. The six-digit figures below are scipy 1.17's
# ttest_ind(A1, A2, equal_var=False) and its confidence_interval().
A1 = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
A2 = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]


def test_welch_textbook_example():
    w = stats.welch(A1, A2)
    assert round(w.t, 2) == -2.46 and round(w.df, 2) == 24.99 and round(w.p, 3) == 0.021
    assert w.t == pytest.approx(-2.455356398286, rel=1e-10)
    assert w.df == pytest.approx(24.988529290231, rel=1e-10)
    assert w.p == pytest.approx(0.021378001462867, rel=1e-8)
    assert w.diff == pytest.approx(sum(A1) / 15 - sum(A2) / 15)
    lo, hi = w.diff - w.ci95(), w.diff + w.ci95()
    assert (lo, hi) == (
        pytest.approx(-3.984096267141, rel=1e-9),
        pytest.approx(-0.349237066192, rel=1e-8),
    )
    # Antisymmetric in its arguments.
    v = stats.welch(A2, A1)
    assert v.t == pytest.approx(-w.t) and v.p == pytest.approx(w.p) and v.df == pytest.approx(w.df)


@pytest.mark.parametrize(
    "df, quantile",
    # Student t table, two-sided 95% (t_{0.975, ν}).
    [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423), (1000, 1.9623)],
)
def test_t_quantiles_match_the_table(df, quantile):
    assert stats.t_ppf(0.975, df) == pytest.approx(quantile, abs=5e-5)
    assert stats.t_cdf(stats.t_ppf(0.975, df), df) == pytest.approx(0.975, abs=1e-12)
    assert stats.t_ppf(0.025, df) == pytest.approx(-quantile, abs=5e-5)


def test_incomplete_beta_closed_forms():
    for x in (0.0, 0.1, 0.37, 0.5, 0.9, 1.0):
        assert stats.betainc(1, 1, x) == pytest.approx(x, abs=1e-14)  # uniform
        assert stats.betainc(3, 1, x) == pytest.approx(x**3, abs=1e-14)
        assert stats.betainc(1, 2, x) == pytest.approx(1 - (1 - x) ** 2, abs=1e-14)
    for a in (0.5, 2.0, 7.5, 40.0):
        assert stats.betainc(a, a, 0.5) == pytest.approx(0.5, abs=1e-13)  # symmetric
    # One degree of freedom is the Cauchy distribution: P(T <= t) = 1/2 + atan(t)/π.
    for t in (-3.0, -0.2, 0.0, 1.0, 12.0):
        assert stats.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-13)


def test_ci95_of_a_fixed_sample():
    # 1..5: mean 3, s = √2.5, half-width t_{0.975,4} · s / √5 = 2.776445 · 0.707107.
    assert stats.mean([1, 2, 3, 4, 5]) == 3
    assert stats.ci95([1, 2, 3, 4, 5]) == pytest.approx(2.7764451052 * math.sqrt(2.5 / 5), rel=1e-9)
    assert stats.ci95([0.5, 0.5, 0.5]) == 0.0
    assert math.isnan(stats.ci95([1.0])) and math.isnan(stats.stdev([1.0]))


def test_welch_edge_cases():
    assert math.isnan(stats.welch([1.0], [1.0, 2.0]).p)  # one run: undefined, not "significant"
    same = stats.welch([0.9, 0.9, 0.9], [0.9, 0.9])
    assert same.p == 1.0 and same.diff == 0.0
    apart = stats.welch([0.95, 0.95], [0.9, 0.9, 0.9])
    assert apart.p == 0.0 and apart.t == math.inf and apart.diff == pytest.approx(0.05)


def test_matches_scipy_on_random_samples():
    import scipy.stats as sp

    rng = random.Random(7)
    for _ in range(200):
        a = [rng.gauss(0, 1) for _ in range(rng.randint(2, 9))]
        b = [rng.gauss(rng.uniform(-2, 2), rng.uniform(0.1, 3)) for _ in range(rng.randint(2, 9))]
        ours, theirs = stats.welch(a, b), sp.ttest_ind(a, b, equal_var=False)
        assert ours.t == pytest.approx(float(theirs.statistic), rel=1e-9)
        assert ours.p == pytest.approx(float(theirs.pvalue), rel=1e-7, abs=1e-12)
        lo, hi = theirs.confidence_interval()
        assert ours.diff - ours.ci95() == pytest.approx(float(lo), rel=1e-7, abs=1e-12)
        assert ours.diff + ours.ci95() == pytest.approx(float(hi), rel=1e-7, abs=1e-12)
    for df in (1, 2.5, 3, 17.3, 200):
        assert stats.t_ppf(0.975, df) == pytest.approx(float(sp.t.ppf(0.975, df)), rel=1e-10)


def _records(name: str, accs: list[float], train: float = 1.0) -> list[dict]:
    return [
        {"variant": name, "seed": i, "test_acc": a, "train_acc": train, "gap": train - a,
         "epoch_s": 0.5, "cpu_s": 10.0, "wall_s": 12.0, "edits": 0 if name == "base" else 9}
        for i, a in enumerate(accs)
    ]  # fmt: skip


def test_rows_on_fixed_records():
    # base: mean 0.90, s = 0.01; reg: mean 0.95, s = 0.01. Welch: t = 0.05 / √(2·0.0001/3)
    # = 6.1237, ν = 4 (equal variances and sizes), two-sided p = 0.003602 (t distribution, ν = 4).
    recs = _records("base", [0.89, 0.90, 0.91]) + _records("reg", [0.94, 0.95, 0.96])
    recs += _records("same", [0.88, 0.90, 0.92])
    rows = report.summarise(recs, ["base", "reg", "same"], "base")
    base, reg, same = rows
    assert base["baseline"] and "vs_baseline" not in base
    assert base["test_acc"]["mean"] == pytest.approx(0.90)
    assert base["test_acc"]["ci95"] == pytest.approx(4.302652729750 * 0.01 / math.sqrt(3))
    assert base["gap"]["mean"] == pytest.approx(0.10)
    vs = reg["vs_baseline"]
    assert vs["diff"] == pytest.approx(0.05)
    assert vs["t"] == pytest.approx(6.123724356958, rel=1e-9)
    assert vs["df"] == pytest.approx(4.0)
    assert vs["p"] == pytest.approx(0.003602, abs=5e-7)
    assert reg["verdict"] == "better" and same["verdict"] == "no significant difference"
    assert same["vs_baseline"]["diff"] == pytest.approx(0.0, abs=1e-12)
    text = report.markdown(rows, "base")
    assert (
        "| `reg` | 3 | 9 | 95.0 ± 2.5 | 100.0 ± 0.0 | 5.0 ± 2.5 | +5.0 ± 2.3 | 0.004 | **better** |"
        in text
    )
    assert "significantly better than `base`: `reg`" in text
    assert "not significantly different from `base`: `same`" in text
    # Holm over the two tests: sorted p 0.003602 → ×2, 1.0 → ×1.
    assert reg["vs_baseline"]["p_holm"] == pytest.approx(2 * 0.003602, abs=1e-6)
    assert same["vs_baseline"]["p_holm"] == 1.0
    assert (
        "After Holm's correction for the 2 comparisons, significant: `reg` (better, p = 0.007)"
        in text
    )


def test_holm_adjustment():
    # Holm 1979 step-down: sorted 0.005·4, 0.01·3, 0.03·2, 0.04·1 → 0.02, 0.03, 0.06, max(0.06, 0.04).
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = stats.holm([0.2, math.nan, 0.01])  # an undefined test is not one of the k
    assert adjusted[0] == pytest.approx(0.2) and math.isnan(adjusted[1])
    assert adjusted[2] == pytest.approx(0.02)
    assert stats.holm([0.6, 0.9]) == [1.0, 1.0]  # capped at 1


def test_rows_with_one_seed_say_na():
    rows = report.summarise(_records("base", [0.9]) + _records("x", [0.95]), ["base", "x"], "base")
    assert rows[1]["verdict"] == "n/a" and math.isnan(rows[1]["test_acc"]["ci95"])
    assert "| `x` | 1 | 9 | 95.0 | 100.0 | 5.0 | +5.0 | – | n/a |" in report.markdown(rows, "base")
    js = report.to_json(rows, [], {})
    assert js["rows"][1]["test_acc"]["ci95"] is None  # JSON has no NaN
