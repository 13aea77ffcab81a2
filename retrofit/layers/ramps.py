"""Rates over training progress t ∈ [0, 1]: the pure functions the layers schedule with.

Ghiasi et al. 2018's "scheduled DropBlock" ramps keep_prob linearly from 1 to its target;
stochastic depth's warm-up (Composer's ``drop_warmup``) ramps survival from 1 to p_l. They live
with the layers that use them; ``retrofit.schedule`` re-exports them with the rules over depth.
"""

from __future__ import annotations

import math

__all__ = ["linear_ramp", "progress", "warmed_up"]


def progress(t: float) -> float:
    """``t`` as a float in [0, 1], or ValueError quoting it."""
    try:
        value = float(t)
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 <= value <= 1.0:  # also rejects nan
        raise ValueError(f"training progress t has to be in [0, 1], but got {t!r}")
    return value


def linear_ramp(t: float, start: float, end: float, ramp: float = 1.0) -> float:
    """Value at progress t of a ramp from ``start`` (t = 0) to ``end`` (t >= ramp), then flat.

    ``start + min(t / ramp, 1) · (end − start)``; returns ``start`` and ``end`` exactly at the
    two ends, so a test (or a log) can compare them with ==.
    """
    t = progress(t)
    if not 0.0 < ramp <= 1.0:
        raise ValueError(f"ramp has to be in (0, 1], but got {ramp}")
    frac = min(t / ramp, 1.0)
    if frac == 1.0:
        return end
    return start - frac * (start - end)


def warmed_up(t: float, target: float, warmup: float) -> float:
    """A rate that goes linearly from 1 (t = 0) to ``target`` (t >= warmup), then holds.

    Stochastic depth's warm-up (Composer's ``drop_warmup``: the drop rate 1 − p_l ramps up from
    0). ``warmup = 0`` is no warm-up: ``target`` at every t.
    """
    t = progress(t)
    if warmup == 0.0:
        return target
    return linear_ramp(t, 1.0, target, warmup)
