"""The statistics of a comparison: means, 95% confidence intervals, Welch's t-test.

Pure functions of lists of floats (standard library only), so they are tested on fixed inputs.

* **Confidence interval of a mean** over n seeds: x̄ ± t_{0.975, n−1} · s / √n, with s the sample
  standard deviation (n − 1 in the denominator) and t the Student-t quantile: with 5 seeds the
  half-width is 2.776 · s / √5, not 1.96 · s / √5.
* **Welch's t-test** (Welch 1947, "The generalization of 'Student's' problem when several
  different population variances are involved"): two means whose variances may differ;
  t = (x̄_a − x̄_b) / √(s_a²/n_a + s_b²/n_b), with the Welch–Satterthwaite degrees of freedom
  ν = (s_a²/n_a + s_b²/n_b)² / ((s_a²/n_a)²/(n_a − 1) + (s_b²/n_b)²/(n_b − 1)), two-sided p.
  It is the test ``tools/results.py`` has used (``scipy.stats.ttest_ind(equal_var=False)``).
* **Holm's correction** (Holm 1979, "A simple sequentially rejective multiple test procedure"):
  testing k variants against one baseline at p < 0.05 each finds about 0.05·k false effects;
  Holm's adjusted p-values control the chance of any false one at 0.05. With the raw p sorted
  ascending, p̃_(i) = max_{j ≤ i} min(1, (k − j + 1) · p_(j)).
* **Student's t distribution** through the regularized incomplete beta function:
  P(|T| > t) = I_{ν/(ν+t²)}(ν/2, 1/2), evaluated with its continued fraction (Abramowitz & Stegun
  26.5.8; modified Lentz's method), and its quantile by bisection on the distribution function.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Welch", "ci95", "holm", "mean", "stdev", "t_cdf", "t_ppf", "t_sf2", "welch"]

_EPS = 1e-15
_TINY = 1e-300


def mean(xs: Sequence[float]) -> float:
    """The arithmetic mean; nan for no values."""
    return statistics.fmean(xs) if len(xs) else math.nan


def stdev(xs: Sequence[float]) -> float:
    """The sample standard deviation (n − 1); nan for fewer than two values."""
    return statistics.stdev(xs) if len(xs) > 1 else math.nan


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of I_x(a, b) (A&S 26.5.8), by the modified Lentz method."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, 10_000):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # even term d_{2m}
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),  # odd term d_{2m+1}
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + num / c
            c = c if abs(c) > _TINY else _TINY
            h *= d * c
        if abs(d * c - 1.0) < _EPS:
            return h
    raise ArithmeticError(f"incomplete beta did not converge for a={a}, b={b}, x={x}")


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) for a, b > 0 and x in [0, 1]."""
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"betainc needs a, b > 0 and 0 <= x <= 1, got a={a}, b={b}, x={x}")
    if x in (0.0, 1.0):
        return x
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    # The fraction converges fast only below the mean of the beta distribution; use the symmetry
    # I_x(a, b) = 1 − I_{1−x}(b, a) above it.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_sf2(t: float, df: float) -> float:
    """Two-sided tail P(|T| > |t|) of Student's t with ``df`` degrees of freedom."""
    if math.isnan(t) or not df > 0:
        return math.nan
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    half = t_sf2(t, df) / 2.0
    return 1.0 - half if t >= 0 else half


def t_ppf(q: float, df: float) -> float:
    """The quantile t with P(T <= t) = q (bisection on :func:`t_cdf`, to ~1e-12)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"t_ppf needs 0 < q < 1, got {q}")
    if q < 0.5:
        return -t_ppf(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        lo, hi = hi, hi * 2.0
    while hi - lo > 1e-12 * max(1.0, hi):
        mid = (lo + hi) / 2.0
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0


def ci95(xs: Sequence[float]) -> float:
    """Half-width of the 95% confidence interval of the mean: t_{0.975, n−1} · s / √n.

    nan for fewer than two values (one run says nothing about the spread).
    """
    n = len(xs)
    if n < 2:
        return math.nan
    return t_ppf(0.975, n - 1) * statistics.stdev(xs) / math.sqrt(n)


@dataclass(frozen=True)
class Welch:
    """Welch's t-test of mean(a) − mean(b): statistic ``t``, degrees of freedom ``df``, two-sided
    ``p``, and ``diff`` = mean(a) − mean(b) with its standard error ``se``. nan where undefined
    (fewer than two values on a side)."""

    t: float
    df: float
    p: float
    diff: float = math.nan
    se: float = math.nan

    def ci95(self) -> float:
        """Half-width of the 95% confidence interval of ``diff``: t_{0.975, df} · se."""
        if math.isnan(self.df) or math.isnan(self.se):
            return math.nan
        return t_ppf(0.975, self.df) * self.se

    def to_dict(self) -> dict[str, float | None]:
        return {k: (None if math.isnan(v) else v) for k, v in vars(self).items()}


def welch(a: Sequence[float], b: Sequence[float]) -> Welch:
    """Welch's unequal-variances t-test of ``a`` against ``b`` (two-sided).

    When both samples have zero variance the statistic is undefined: equal means give p = 1
    (nothing to tell apart), different means p = 0 (every run of one beat every run of the other
    by the same margin), as ``tools/results.py`` reports them.
    """
    na, nb = len(a), len(b)
    diff = mean(a) - mean(b) if na and nb else math.nan
    if na < 2 or nb < 2:
        return Welch(math.nan, math.nan, math.nan, diff)
    va, vb = statistics.variance(a) / na, statistics.variance(b) / nb
    if va + vb == 0:
        if diff == 0:
            return Welch(math.nan, math.nan, 1.0, diff, 0.0)
        return Welch(math.copysign(math.inf, diff), math.nan, 0.0, diff, 0.0)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (na - 1) + vb**2 / (nb - 1))
    return Welch(diff / se, df, t_sf2(diff / se, df), diff, se)


def holm(ps: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the input order; a nan (an undefined test) stays nan and does
    not count among the k tests."""
    order = sorted((p, i) for i, p in enumerate(ps) if not math.isnan(p))
    k = len(order)
    out = [math.nan] * len(ps)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (k - rank) * p))
        out[i] = running
    return out
