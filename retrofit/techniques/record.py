"""The technique record: one per regularizer, and everything else derives from it.

A technique is its recipe section and the typed spec it validates into, the planner that turns
an analysis of a model into edits, the layer an edit inserts (its class and a constructor that
reads the edit's typed ``settings``), the rewrite actions its edits use (``retrofit.edit.ACTIONS``),
what it needs verification to hold still (its eval-neutral context), the figures it reports (plan
table and summary, the statistics' scalars, console parts, what metrics.jsonl and the plots
carry), whether it leaves parameters unused under DDP and, for an input-side technique, its
input transform. The recipe's sections, the planners ``retrofit.plan`` runs, the layers
``retrofit.rewrite.execute`` builds, the report's tables, ``retrofit.schedule``'s figures, the
trainer's logging and plots and the DDP flag are all read from
:data:`retrofit.techniques.TECHNIQUES`, so they cannot disagree (``tests/test_techniques.py``
checks both directions); nothing outside ``retrofit/techniques/`` compares a string to a
technique's name. A new technique is one module here, its layer in ``retrofit/layers/`` and a
card in ``recipes/README.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

if TYPE_CHECKING:
    import torch

    from retrofit.analysis.context import Analysis
    from retrofit.edit import Edit

__all__ = ["Figures", "Technique"]

Rate = Mapping[str, Any]  # one layer's ``rates()`` with its ``kind`` (schedule.current_rates)


def _nothing(_: Any) -> dict[str, float]:
    return {}


def _no_parts(_: Mapping[str, Any]) -> list[str]:
    return []


@dataclass(frozen=True)
class Figures:
    """The numbers a technique's layers report, wherever they are shown.

    ``means``: its layers' rates (``schedule.current_rates`` values of its kind, in model order)
    → the scalars of ``schedule.summary`` (``sd_kept`` …: the console, metrics.jsonl, every
    framework logger). ``planned``: the plan's edits of its kind (``Edit.to_dict`` form) → the
    planned scalars read beside them (``sd_planned``). ``parts``: a record of scalars (a
    lifecycle report, a step or epoch record of metrics.jsonl) → the console's wording of the
    ones present. ``logged``: the scalars a step record of metrics.jsonl carries, each with how
    an epoch record sums up its steps (``"mean"`` or ``"last"``). ``plot``: one layer's rates →
    the static facts the plots need (None: not plotted). ``per_depth``: its layers report a
    block depth l and a kept fraction: they join ``schedule.block_rates`` and, with planned
    survivals in the plan, ``survival.png``.
    """

    means: Callable[[Sequence[Rate]], dict[str, float]] = _nothing
    planned: Callable[[Sequence[Mapping[str, Any]]], dict[str, float]] = _nothing
    parts: Callable[[Mapping[str, Any]], list[str]] = _no_parts
    logged: Mapping[str, str] = field(default_factory=dict)
    plot: Callable[[Rate], dict[str, Any] | None] = lambda _: None
    per_depth: bool = False


@dataclass(frozen=True)
class Technique:
    """One regularizer as the program sees it.

    ``name``: the recipe section and every edit's ``kind``. ``parse``: the section's value →
    its spec (None: disabled), raising ``RecipeError`` naming the bad field. ``spec``: the spec's
    class. ``fields``: the spec's field names (a top-level ``p_L:`` is pointed at its section).
    ``planner``: (analysis, spec) → edits; None for a technique that acts on the inputs rather
    than the model (Cutout, which the trainer applies per batch). ``layer``: edit → the module
    it inserts (no parameters or buffers), built from ``edit.settings``; ``layer_class``: its
    class (a trace keeps it as a leaf). ``actions``: the rewrite actions its edits may use.
    ``excludes``: sections that may not be enabled with this one, with the reason.

    Reporting: ``table`` (edits, model name) → the plan table's lines (None: the generic table);
    ``summary`` edits → parts of ``Plan.summary``; ``figures`` (:class:`Figures`); ``note`` spec →
    the plan's note for a technique without edits (Cutout).

    Training and verification: ``neutral`` model → a context under which its layers are the
    identity in eval (verification compares against the original there; stochastic depth's
    ``scaling: paper`` multiplies by p_l in eval by design); ``liveness`` model → the training
    passes verification's liveness check runs, each (what it forces, the layers it changes, a
    context forcing it), kept path first (stochastic depth's gates forced onto their kept, then
    dropped, path; none: one pass as the layers draw); ``unused_parameters`` (spec,
    model) → whether a step may leave parameters without a gradient (DDP's
    ``find_unused_parameters``); ``input_transform`` spec → ``f(images, generator)``, applied
    to every training batch (Cutout).
    """

    name: str
    parse: Callable[[Any], Any]
    fields: tuple[str, ...] = ()
    spec: type | None = None
    planner: Callable[[Analysis, Any], list[Edit]] | None = None
    layer: Callable[[Edit], nn.Module] | None = None
    layer_class: type[nn.Module] | None = None
    actions: tuple[str, ...] = ()
    excludes: Mapping[str, str] = field(default_factory=dict)
    table: Callable[[Sequence[Edit], str], list[str]] | None = None
    summary: Callable[[Sequence[Edit]], list[str]] | None = None
    figures: Figures = field(default_factory=Figures)
    note: Callable[[Any], str] | None = None
    neutral: Callable[[nn.Module], AbstractContextManager[None]] | None = None
    liveness: Callable[[nn.Module], list[tuple[str, Sequence[nn.Module], Any]]] | None = None
    unused_parameters: Callable[[Any, nn.Module], bool] | None = None
    input_transform: Callable[[Any], Callable[[Tensor, torch.Generator | None], Tensor]] | None = (
        None
    )

    @property
    def edits_model(self) -> bool:
        return self.planner is not None
