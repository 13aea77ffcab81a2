"""Counting for the drop-path modules a model already had and retrofit reused.

When a model has its own drop-path slot on a residual branch (timm's ``DropPath``, torchvision's
``StochasticDepth``), row-mode stochastic depth sets that module's rate to 1 − p_l instead of
stacking a gate on it (``retrofit.rewrite.execute``). To report what it kept, :func:`watch_slot` gives the
module an instance ``forward`` that computes what both libraries compute in training — one
Bernoulli(1 − rate) draw per row, divided by 1 − rate, times x (the same draws from the same
global RNG) — with its mask in hand, and adds the batch size and the kept rows to two counters.
(Counting from the output instead is wrong exactly when it matters: timm zero-initialises the
last BatchNorm of each block, so at the start every branch output is 0, kept or not.) In eval,
or at rate 0, the class's own forward runs. The counters are non-persistent buffers of the slot:
they move with the model, count inside a compiled graph and stay out of the ``state_dict``;
:func:`unwatch_slot` (``retrofit.strip``) removes them and the forward again.
:func:`slot_rates` reports a slot in the same form as a gate's ``rates()``.
"""

from __future__ import annotations

import functools
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
    kind: str  # the technique that reused it (its record's name, given by the rewrite)
    depth: int | None
    target_survival: float


def _forward(module: nn.Module, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    info: _Slot = module.__dict__[_INFO]
    rate = float(getattr(module, info.attr))
    if not module.training or rate == 0.0 or args or kwargs or not isinstance(x, Tensor):
        return type(module).forward(module, x, *args, **kwargs)
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    getattr(module, _CALLS).add_(x.shape[0])
    getattr(module, _KEPT).add_(mask.detach().sum().to(torch.int64))
    if keep > 0.0 and getattr(module, "scale_by_keep", True):
        mask.div_(keep)
    return x * mask


def watch_slot(module: nn.Module, attr: str, depth: int | None, survival: float, kind: str) -> None:
    """Count ``module``'s kept rows from now on (see the module docstring), reported as a layer
    of technique ``kind``; idempotent."""
    if watched(module):
        return
    device = next((b.device for b in module.buffers()), torch.device("cpu"))
    for name in (_CALLS, _KEPT):
        module.register_buffer(name, torch.zeros((), dtype=torch.int64, device=device), False)
    module.__dict__[_INFO] = _Slot(attr, kind, depth, float(survival))
    module.__dict__["forward"] = functools.partial(_forward, module)


def unwatch_slot(module: nn.Module) -> None:
    """Undo :func:`watch_slot` (nothing to do on a module that is not watched)."""
    if module.__dict__.pop(_INFO, None) is None:
        return
    for name in (_CALLS, _KEPT):
        module._buffers.pop(name, None)
    forward = module.__dict__.get("forward")
    if isinstance(forward, functools.partial) and forward.func is _forward:
        del module.__dict__["forward"]


def watched(module: nn.Module) -> bool:
    return _INFO in module.__dict__


def reset_slot(module: nn.Module) -> None:
    """Zero a watched slot's counters (a new log window)."""
    if watched(module):
        getattr(module, _CALLS).zero_()
        getattr(module, _KEPT).zero_()


def slot_rates(module: nn.Module) -> dict[str, Any] | None:
    """A watched slot's ``kind`` (as ``retrofit.schedule.current_rates`` gives it), settings and
    counters, with the keys of ``StochasticDepthGate.rates()`` (None for a module that is not
    watched)."""
    info: _Slot | None = module.__dict__.get(_INFO)
    if info is None:
        return None
    calls, kept = (int(v) for v in torch.stack([getattr(module, _CALLS), getattr(module, _KEPT)]))
    return {
        "kind": info.kind,
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
