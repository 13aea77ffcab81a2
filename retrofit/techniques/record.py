"""The technique record: one per regularizer, and everything else derives from it.

A technique is its recipe section, the spec that section validates into, the planner that turns
an analysis of a model into edits, and the layer an edit inserts. The recipe's sections, the
planners ``retrofit.plan`` runs, the layers ``retrofit.rewrite.execute`` builds and the trainer's notion of
"this recipe edits the model" are all read from :data:`retrofit.techniques.TECHNIQUES` when they
are needed, so they cannot disagree (``tests/test_techniques.py``); the layers a trace keeps as
leaves are read from ``retrofit.layers``' exports (``capture/existing.py``). A new technique is one
module here, its layer in ``retrofit/layers/`` and a card in ``recipes/README.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from retrofit.analysis.context import Analysis
    from retrofit.edit import Edit

__all__ = ["Technique"]


@dataclass(frozen=True)
class Technique:
    """One regularizer as the program sees it.

    ``name``: the recipe section and every edit's ``kind``. ``parse``: the section's value →
    its spec (None: disabled), raising ``RecipeError`` naming the bad field. ``fields``: the
    spec's field names (a top-level ``p_L:`` is pointed at its section). ``planner``: (analysis,
    spec) → edits; None for a technique that acts on the inputs rather than the model (Cutout,
    which the trainer applies per batch). ``layer``: edit → the module it inserts (no parameters
    or buffers). ``excludes``: sections that may not be enabled with this one, with the reason.
    """

    name: str
    parse: Callable[[Any], Any]
    fields: tuple[str, ...] = ()
    planner: Callable[[Analysis, Any], list[Edit]] | None = None
    layer: Callable[[Edit], nn.Module] | None = None
    excludes: Mapping[str, str] = field(default_factory=dict)

    @property
    def edits_model(self) -> bool:
        return self.planner is not None
