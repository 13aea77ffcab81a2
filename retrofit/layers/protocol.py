"""What every layer retrofit inserts offers the rest of the program (a typed protocol).

``kind``: the technique it serves (its recipe section). ``rates()``: its current settings and
counters, JSON-ready, for logging (``retrofit.schedule.current_rates``, the trainer's metrics and
plots). Layers driven by training progress also have ``set_progress(t)``
(``retrofit.schedule.update``); layers that count what they did (kept branches) have
``reset_stats()``, which starts a new measuring window. Nothing reads a layer's private attributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

__all__ = ["Counting", "Outline", "Progressive", "Reporting"]


@runtime_checkable
class Reporting(Protocol):
    kind: str

    def rates(self) -> dict[str, Any]: ...


@runtime_checkable
class Progressive(Protocol):
    def set_progress(self, t: float) -> None: ...


@runtime_checkable
class Counting(Protocol):
    def reset_stats(self) -> None: ...


@dataclass(frozen=True)
class Outline:
    """How the outlined residual add must behave; decided by the rewrite from the owner's graph.

    The rewrite's ``outline`` action (``retrofit.edit.ACTIONS``) calls a layer that takes the
    outlined form as ``layer(shortcut, *inputs, branch=f, outline=Outline(...))`` and sets its
    ``outlined`` attribute (stochastic depth's gate in batch/subset mode).

    ``batched[i]``: input i carries the batch dimension (it depends on the module's input), so
    subset mode feeds the branch only the kept rows of it. ``inplace``: ``"shortcut"`` when the
    model wrote ``shortcut.add_(f)`` (the gate then adds in place too: the same aliasing as the
    original), ``"branch"`` for ``f.add_(shortcut)`` (the result keeps f's dtype), else ``""``.
    ``copy_dropped``: something downstream may mutate the add's result in place, or it leaves the
    module; a dropped branch then returns a copy of the shortcut, never the shortcut itself
    (e.g. torchvision's ``relu(out + identity)`` with ``inplace=True`` would otherwise overwrite
    the block's input, which autograd still needs).
    """

    batched: tuple[bool, ...] = ()
    inplace: str = ""
    copy_dropped: bool = True
