"""Training-progress schedules for the inserted regularizers.

Some rates are not constant over training. DropBlock's keep_prob goes linearly from 1 to its
target (Ghiasi et al. 2018, "Scheduled DropBlock": a fixed low keep_prob from the start hurts
early training). A training loop, retrofit's or the user's own, calls

    retrofit.schedule.update(model, t)      # t = step / total_steps, in [0, 1]

once per step; every submodule with a ``set_progress(t)`` method is updated. Stochastic depth
gates have no such method: their survival schedule is over depth (p_l = 1 − (l/L)(1 − p_L)),
fixed when the plan is made, not over time.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

__all__ = ["current_rates", "linear_ramp", "update"]


def _progress(t: float) -> float:
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
    t = _progress(t)
    if not 0.0 < ramp <= 1.0:
        raise ValueError(f"ramp has to be in (0, 1], but got {ramp}")
    frac = min(t / ramp, 1.0)
    if frac == 1.0:
        return end
    return start - frac * (start - end)


def update(model: nn.Module, t: float) -> None:
    """Set every inserted regularizer's rate for training progress t ∈ [0, 1]."""
    t = _progress(t)
    for module in model.modules():
        set_progress = getattr(module, "set_progress", None)
        if callable(set_progress):
            set_progress(t)


def current_rates(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Current rate of every retrofit regularizer, by module name, for logging.

    Each value has a ``kind`` (``"stochastic_depth"``, ``"dropblock"``, ``"uout"``,
    ``"cutout"``) and that layer's hyper-parameters; gates add their measured
    ``kept_fraction`` (reading it may synchronise an accelerator once), whether the branch is
    ``outlined`` (skipped when dropped), their ``seed`` and ``draws`` counter, and ``recent``:
    the kept fraction of each training call since the last ``reset_stats()`` (at most
    ``StochasticDepthGate.HISTORY``).
    """
    # Imported here: retrofit.layers.dropblock imports linear_ramp from this module.
    from retrofit.layers import BatchCutout, DropBlock, StochasticDepthGate, Uout

    rates: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if isinstance(module, StochasticDepthGate):
            rates[name] = {
                "kind": "stochastic_depth",
                "depth": module.depth,
                "survival": module.survival,
                "mode": module.mode,
                "scaling": module.scaling,
                "calls": module.calls,
                "kept_fraction": module.kept_fraction,
                "outlined": module.outlined,
                "seed": module.seed,
                "draws": module.draws,
                # Kept fraction of each recent training call (1.0/0.0 in batch mode): the
                # kept/dropped sequence since the last reset_stats().
                "recent": list(module.history),
            }
        elif isinstance(module, DropBlock):
            rates[name] = {
                "kind": "dropblock",
                "keep_prob": module.keep_prob,
                "target_keep_prob": module.target_keep_prob,
                "block_size": module.block_size,
                "per_channel": module.per_channel,
                "ramp": module.ramp,
            }
        elif isinstance(module, Uout):
            rates[name] = {"kind": "uout", "beta": module.beta}
        elif isinstance(module, BatchCutout):
            rates[name] = {"kind": "cutout", "n_holes": module.n_holes, "length": module.length}
    return rates
