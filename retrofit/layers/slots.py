"""Counting for the drop-path modules a model already had and retrofit reused.

When a model has its own drop-path slot on a residual branch (timm's ``DropPath``, torchvision's
``StochasticDepth``), row-mode stochastic depth sets that module's rate to 1 − p_l instead of
stacking a gate on it (``retrofit.rewrite``). The module draws its own masks, so to report what it
kept, :func:`watch_slot` gives it two counters and a forward hook: every training call adds its
batch size to ``retrofit_calls`` and the number of rows whose output is not all zeros to
``retrofit_kept`` (a dropped row is exactly zero; a kept row is x/p_l, zero only if the branch
output row was all zeros already, which a residual branch's output never is in practice).
The counters are non-persistent buffers of the slot — tensors that move with the model, count
inside a compiled graph (the hook is traced with the module) and stay out of the ``state_dict`` —
and :func:`unwatch_slot` (``retrofit.strip``) removes them and the hook again.
:func:`slot_rates` reports a slot in the same form as a gate's ``rates()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["reset_slot", "slot_rates", "unwatch_slot", "watch_slot", "watched"]

_INFO = "_retrofit_slot"
_CALLS, _KEPT = "retrofit_calls", "retrofit_kept"


@dataclass(frozen=True)
class _Slot:
    attr: str  # the attribute holding the drop probability (``drop_prob``, ``p``)
    depth: int | None
    target_survival: float


def _count(module: nn.Module, args: Any, output: Any) -> None:
    if not module.training or not isinstance(output, Tensor) or output.ndim == 0:
        return
    n = output.shape[0]
    kept = output.detach().reshape(n, -1).ne(0).any(1).sum()
    getattr(module, _CALLS).add_(n)
    getattr(module, _KEPT).add_(kept)


def watch_slot(module: nn.Module, attr: str, depth: int | None, survival: float) -> None:
    """Count ``module``'s kept rows from now on (see the module docstring); idempotent."""
    if watched(module):
        return
    device = next((b.device for b in module.buffers()), torch.device("cpu"))
    for name in (_CALLS, _KEPT):
        module.register_buffer(name, torch.zeros((), dtype=torch.int64, device=device), False)
    module.__dict__[_INFO] = _Slot(attr, depth, float(survival))
    module.register_forward_hook(_count)


def unwatch_slot(module: nn.Module) -> None:
    """Undo :func:`watch_slot` (nothing to do on a module that is not watched)."""
    if module.__dict__.pop(_INFO, None) is None:
        return
    for name in (_CALLS, _KEPT):
        module._buffers.pop(name, None)
    for key, hook in list(module._forward_hooks.items()):
        if hook is _count:
            del module._forward_hooks[key]


def watched(module: nn.Module) -> bool:
    return _INFO in module.__dict__


def reset_slot(module: nn.Module) -> None:
    """Zero a watched slot's counters (a new log window)."""
    if watched(module):
        getattr(module, _CALLS).zero_()
        getattr(module, _KEPT).zero_()


def slot_rates(module: nn.Module) -> dict[str, Any] | None:
    """A watched slot's settings and counters, with the keys of
    ``StochasticDepthGate.rates()`` (None for a module that is not watched)."""
    info: _Slot | None = module.__dict__.get(_INFO)
    if info is None:
        return None
    calls, kept = (int(v) for v in torch.stack([getattr(module, _CALLS), getattr(module, _KEPT)]))
    return {
        "depth": info.depth,
        "survival": 1.0 - float(getattr(module, info.attr)),
        "target_survival": info.target_survival,
        "warmup": 0.0,
        "mode": "row",
        "scaling": "inverted",
        "calls": calls,
        "kept": kept,
        "kept_fraction": kept / calls if calls else None,
        "outlined": False,
        "seed": None,
        "draws": None,
        "reused": type(module).__name__,
        "recent": [],
    }
