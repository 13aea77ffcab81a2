"""The techniques retrofit knows, one record each (``record.py``), in recipe order.

:data:`TECHNIQUES` is the one registry: the recipe's sections, the planners, the layers the
rewrite inserts and the trainer's "does this recipe edit the model" are read from it.
"""

from __future__ import annotations

from retrofit.techniques import cutout, dropblock, dropout_fix, stochastic_depth, uout
from retrofit.techniques.record import Technique

__all__ = ["TECHNIQUES", "Technique", "model_edits"]

TECHNIQUES: dict[str, Technique] = {
    t.name: t
    for t in (
        stochastic_depth.TECHNIQUE,
        dropblock.TECHNIQUE,
        uout.TECHNIQUE,
        dropout_fix.TECHNIQUE,
        cutout.TECHNIQUE,
    )
}


def model_edits() -> tuple[str, ...]:
    """The sections whose technique edits the model (has a planner)."""
    return tuple(name for name, t in TECHNIQUES.items() if t.edits_model)
