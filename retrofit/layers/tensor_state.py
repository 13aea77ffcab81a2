"""The small tensors a layer changes during training: rates a schedule moves, counters.

Why tensors: ``torch.compile`` guards on the Python floats and ints a traced forward reads
(``survival == 0.98958``), so a rate that moves every step recompiles every step, and counters
incremented in Python do not run inside a compiled graph at all. A 0-dim tensor read by the graph
is a graph input instead: changing it in place between steps (``fill_``) needs no recompile, and
``add_`` on it inside the graph is an in-graph update that inductor fuses into the layer's kernels.

Why not buffers: a layer retrofit inserts holds no parameters and no buffers (DESIGN: the model
keeps its ``state_dict`` keys, and ``module.buffers()`` stays the user's own, so DDP's buffer
broadcast and BatchNorm syncing do not see them). So the tensors live in this holder, which a
layer's ``_apply`` moves along with the module (``.to(device)``, ``.cuda()``) without changing
their dtypes (``.half()`` must not round a survival or an integer counter), and which copies
deeply on ``copy.copy`` too: ``retrofit.verify.checks``'s checks save a layer's attributes with
``copy.copy`` and put them back afterwards, so the saved copy must not alias the live tensors.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["MirroredRate", "TensorState", "scalar"]


class TensorState:
    """Named 0-dim tensors (``state.survival``, ``state.calls``, …), see the module docstring."""

    def __init__(self, **tensors: Tensor) -> None:
        self.__dict__.update(tensors)

    def apply(self, fn: Callable[[Tensor], Tensor]) -> None:
        """What ``nn.Module._apply(fn)`` does to a module's tensors, keeping each dtype."""
        for name, t in list(self.__dict__.items()):
            moved = fn(t)
            self.__dict__[name] = moved if moved.dtype == t.dtype else moved.to(t.dtype)

    def __copy__(self) -> TensorState:
        return TensorState(**{k: v.detach().clone() for k, v in self.__dict__.items()})

    def __deepcopy__(self, memo: dict[int, Any]) -> TensorState:
        return copy.copy(self)

    def __repr__(self) -> str:
        return "TensorState(" + ", ".join(f"{k}={v.item()}" for k, v in self.__dict__.items()) + ")"


def scalar(value: float | int, dtype: torch.dtype) -> Tensor:
    """A 0-dim CPU tensor (layers are built on the CPU; ``_apply`` moves them)."""
    return torch.tensor(value, dtype=dtype)


class MirroredRate:
    """A layer's rate as a float attribute mirrored in the 0-dim tensor of the same name in the
    layer's ``_t`` (:class:`TensorState`): reading gives the float (eager code, reprs, logs),
    setting fills the tensor in place (what a compiled graph reads, so a change never
    recompiles). The float lives in the layer's ``__dict__`` as ``_<name>``, so saving and
    restoring a layer's ``__dict__`` (``retrofit.verify.checks``) covers it."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name, self.slot = name, f"_{name}"

    def __get__(self, layer: Any, owner: type | None = None) -> Any:
        return self if layer is None else layer.__dict__[self.slot]

    def __set__(self, layer: Any, value: float) -> None:
        value = float(value)
        if value != layer.__dict__.get(self.slot):
            getattr(layer._t, self.name).fill_(value)
            layer.__dict__[self.slot] = value
