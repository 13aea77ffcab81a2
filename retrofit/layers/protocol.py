"""What every layer retrofit inserts offers the rest of the program (a typed protocol).

``kind``: the technique it serves (its recipe section). ``rates()``: its current settings and
counters, JSON-ready, for logging (``retrofit.schedule.current_rates``, the trainer's metrics and
plots). Layers driven by training progress also have ``set_progress(t)``
(``retrofit.schedule.update``). Nothing reads a layer's private attributes.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["Progressive", "Reporting"]


@runtime_checkable
class Reporting(Protocol):
    kind: str

    def rates(self) -> dict[str, Any]: ...


@runtime_checkable
class Progressive(Protocol):
    def set_progress(self, t: float) -> None: ...
