"""A comparison's records → one table (Markdown and JSON) and one plot.

Per variant, over its seeds: test accuracy, train accuracy and their difference (the
generalization gap, in points), each as mean ± the half-width of its 95% confidence interval;
against the baseline, the difference of mean test accuracies with its 95% CI and Welch's
two-sided p (:mod:`retrofit.compare.stats`), called significant only at p < 0.05; seconds per
epoch and CPU seconds per run (timing, unlike the accuracies, varies between invocations).
With several variants tested against one baseline, Holm's adjusted p-values say which effects
survive the multiple comparison (``p_holm`` in the JSON, and the sentence under the table).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from retrofit.compare import stats

__all__ = ["ALPHA", "markdown", "plot", "summarise", "to_json"]

ALPHA = 0.05


def _stat(xs: Sequence[float]) -> dict[str, Any]:
    return {"mean": stats.mean(xs), "ci95": stats.ci95(xs), "values": list(xs)}


def _numbers(records: list[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in records if isinstance(r.get(key), (int, float))]


def verdict(p: float, diff: float) -> str:
    """``better`` / ``worse`` (significant at p < ALPHA), ``no significant difference``, or
    ``n/a`` when the test is undefined (fewer than two seeds on a side)."""
    if math.isnan(p):
        return "n/a"
    if p < ALPHA:
        return "better" if diff > 0 else "worse"
    return "no significant difference"


def summarise(
    records: list[dict[str, Any]], variants: Sequence[str], baseline: str
) -> list[dict[str, Any]]:
    """One row per variant (in the given order) from the run records."""
    by = {
        v: sorted((r for r in records if r["variant"] == v), key=lambda r: r["seed"])
        for v in variants
    }
    ref = _numbers(by.get(baseline, []), "test_acc")
    rows = []
    for v in variants:
        rs = by[v]
        test = _numbers(rs, "test_acc")
        row: dict[str, Any] = {
            "variant": v,
            "n": len(rs),
            "seeds": [r["seed"] for r in rs],
            "test_acc": _stat(test),
            "train_acc": _stat(_numbers(rs, "train_acc")),
            "gap": _stat(_numbers(rs, "gap")),
            "epoch_s": stats.mean(_numbers(rs, "epoch_s")),
            "cpu_s": stats.mean(_numbers(rs, "cpu_s")),
            "wall_s": stats.mean(_numbers(rs, "wall_s")),
            "edits": rs[0]["edits"] if rs else None,
            "edit_kinds": rs[0].get("edit_kinds", {}) if rs else {},
            "baseline": v == baseline,
            "metric": rs[0].get("metric", "val_top1") if rs else "val_top1",
        }
        if v != baseline:
            w = stats.welch(test, ref)
            row["vs_baseline"] = {**w.to_dict(), "ci95": _none(w.ci95())}
            row["verdict"] = verdict(w.p, w.diff)
        rows.append(row)
    tested = [r for r in rows if not r["baseline"]]
    raw = [math.nan if r["vs_baseline"]["p"] is None else r["vs_baseline"]["p"] for r in tested]
    for r, p in zip(tested, stats.holm(raw), strict=True):
        r["vs_baseline"]["p_holm"] = _none(p)
    return rows


def _none(x: float) -> float | None:
    return None if isinstance(x, float) and math.isnan(x) else x


def _clean(x: Any) -> Any:
    """NaN/inf → None, recursively (JSON has neither)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def to_json(
    rows: list[dict[str, Any]], records: list[dict[str, Any]], meta: dict[str, Any]
) -> dict[str, Any]:
    """The table as a JSON-ready dict: ``meta`` (settings, command), ``rows``, every run record."""
    return _clean({**meta, "alpha": ALPHA, "rows": rows, "runs": records})


def _pm(stat: dict[str, Any], scale: float = 100.0, digits: int = 1) -> str:
    m, h = stat["mean"], stat["ci95"]
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "–"
    if h is None or (isinstance(h, float) and math.isnan(h)):
        return f"{m * scale:.{digits}f}"
    return f"{m * scale:.{digits}f} ± {h * scale:.{digits}f}"


def _num(x: Any, digits: int) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _p(p: Any) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "–"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _p_is(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"= {p:.3f}"


def markdown(rows: list[dict[str, Any]], baseline: str) -> str:
    """The table in Markdown, with a sentence naming the significant differences."""
    from retrofit.compare.runs import metric_name

    name = "acc" if metric_name(rows) == "accuracy" else metric_name(rows)
    lines = [
        f"| variant | seeds | edits | test {name} % | train {name} % | gap (points) | "
        f"Δ test vs `{baseline}` (points) | p (Welch) | verdict | s / epoch | CPU s / run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        delta, p, word = _versus_baseline(r)
        lines.append(
            f"| `{r['variant']}` | {r['n']} | {r['edits'] if r['edits'] is not None else '–'} | "
            f"{_pm(r['test_acc'])} | {_pm(r['train_acc'])} | {_pm(r['gap'])} | {delta} | {p} | "
            f"{word} | {_num(r['epoch_s'], 2)} | {_num(r['cpu_s'], 1)} |"
        )
    n = max((r["n"] for r in rows), default=0)
    said = _verdicts(rows, baseline)
    lines += [
        "",
        f"± is the half-width of the 95% confidence interval over the seeds (Student t, n − 1 "
        f"degrees of freedom); the Δ column's interval and p come from Welch's t-test against "
        f"`{baseline}`, significant at p < {ALPHA}. In words, at p < {ALPHA}: "
        + ("; ".join(said) if said else "nothing to compare")
        + "."
        + _holm_sentence(rows)
        + f" With {n} seed(s) per variant a 'not significantly different' means this "
        "comparison cannot tell, not that the technique does nothing.",
    ]
    return "\n".join(lines) + "\n"


def _versus_baseline(r: dict[str, Any]) -> tuple[str, str, str]:
    """A row's Δ (± its 95% CI half-width), p and verdict cells (the baseline: "reference")."""
    if r["baseline"]:
        return "reference", "", ""
    vs = r["vs_baseline"]
    d, h = vs.get("diff"), vs.get("ci95")
    if d is None or (isinstance(d, float) and math.isnan(d)):
        delta = "–"
    elif h is None or (isinstance(h, float) and math.isnan(h)):
        delta = f"{d * 100:+.1f}"
    else:
        delta = f"{d * 100:+.1f} ± {h * 100:.1f}"
    word = f"**{r['verdict']}**" if r["verdict"] in ("better", "worse") else r["verdict"]
    return delta, _p(vs.get("p")), word


def _verdicts(rows: list[dict[str, Any]], baseline: str) -> list[str]:
    """The variants grouped by verdict against the baseline, one phrase a non-empty group."""
    groups: dict[str, list[str]] = {
        "better": [], "worse": [], "no significant difference": [], "n/a": []
    }  # fmt: skip
    for r in rows:
        if not r["baseline"]:
            groups[r["verdict"]].append(f"`{r['variant']}`")
    said = []
    for key, label in (
        ("better", "significantly better than"),
        ("worse", "significantly worse than"),
        ("no significant difference", "not significantly different from"),
        ("n/a", "not testable (fewer than 2 seeds) against"),
    ):
        if groups[key]:
            said.append(f"{label} `{baseline}`: {', '.join(groups[key])}")
    return said


def _holm_sentence(rows: list[dict[str, Any]]) -> str:
    """Which differences stay significant after Holm's correction (only with 2+ comparisons)."""
    tested = [r for r in rows if not r["baseline"] and r["vs_baseline"].get("p_holm") is not None]
    if len(tested) <= 1:
        return ""
    holm_sig = [r for r in tested if r["vs_baseline"]["p_holm"] < ALPHA]
    names = ", ".join(
        f"`{r['variant']}` ({r['verdict']}, p {_p_is(r['vs_baseline']['p_holm'])})"
        for r in holm_sig
    )
    return (
        f" After Holm's correction for the {len(tested)} comparisons, significant: "
        + (names if holm_sig else "none")
        + "."
    )


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Test accuracy, gap and seconds per epoch per variant (mean ± 95% CI, dots: seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from retrofit.compare.runs import metric_name

    metric = metric_name(rows)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    labels = [r["variant"] for r in rows]
    xs = list(range(len(rows)))
    for ax, key, name, scale, bounds in (
        (axes[0], "test_acc", f"test {metric} (%)", 100.0, (0.0, 100.0)),
        (axes[1], "gap", f"train − test {metric} (points)", 100.0, (-100.0, 100.0)),
    ):
        span: list[float] = []  # every value drawn, for the axis limits
        for i, r in enumerate(rows):
            vals = [v * scale for v in r[key]["values"]]
            if vals:
                # A fixed spread of the seeds' dots around the column (no random jitter: the
                # plot is a function of the numbers).
                k = len(vals)
                offs = [(j - (k - 1) / 2) * 0.06 for j in range(k)]
                ax.scatter([i + o for o in offs], vals, s=9, color="0.55", zorder=2)
                span += vals
            m, h = r[key]["mean"], r[key]["ci95"]
            if m is not None and not math.isnan(m):
                err = 0 if h is None or math.isnan(h) else h * scale
                # A t interval over few seeds can run past what the metric can be (with 2 seeds
                # t = 12.7): the bar stops at the bound, which is all the data can say.
                lo, hi = max(bounds[0], m * scale - err), min(bounds[1], m * scale + err)
                color = "#c44e52" if r["baseline"] else "#4c72b0"
                ax.errorbar(i, m * scale, yerr=[[m * scale - lo], [hi - m * scale]], fmt="o",
                            color=color, capsize=5, zorder=3)  # fmt: skip
                span += [lo, hi]
        base = next((r for r in rows if r["baseline"]), None)
        if base is not None and base[key]["mean"] is not None and not math.isnan(base[key]["mean"]):
            ax.axhline(base[key]["mean"] * scale, color="#c44e52", lw=0.8, ls="--", zorder=1)
        if span:
            pad = max(0.05 * (max(span) - min(span)), 0.5)
            ax.set_ylim(max(bounds[0], min(span) - pad), min(bounds[1], max(span) + pad))
        ax.set_title(name)
    axes[2].bar(
        xs,
        [0 if r["epoch_s"] is None or math.isnan(r["epoch_s"]) else r["epoch_s"] for r in rows],
        color="#8c8c8c",
    )
    axes[2].set_title("seconds per epoch (wall clock)")
    for ax in axes:
        ax.set_xticks(xs, labels, rotation=35, ha="right")
        ax.grid(axis="y", alpha=0.3)
    n = max((r["n"] for r in rows), default=0)
    fig.suptitle(f"{title}: mean ± 95% CI over {n} seeds (grey dots: single runs; red: baseline)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png", metadata={"Software": None})
    plt.close(fig)
    tmp.replace(path)
    return path
