"""Sites + recipe → a Plan: the list of edits a rewrite will make. The dry run is a plan.

Each technique's planner (``retrofit/techniques/``) is a function ``(analysis, spec) ->
list[Edit]``. Planners read the analysis (traced graphs and the sites found in them) and never
touch the model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from retrofit.analysis.context import Analysis
from retrofit.capture.patching import trace_session
from retrofit.capture.sandbox import young_objects_only
from retrofit.capture.trace import Skipped
from retrofit.edit import Edit
from retrofit.errors import TraceError
from retrofit.recipe import Recipe, load_recipe
from retrofit.techniques import TECHNIQUES

__all__ = ["Analysis", "Edit", "Plan", "plan", "planners"]


def planners() -> dict[str, Planner]:
    """Section name → planner, for every technique that edits the model (read from
    ``retrofit.techniques.TECHNIQUES`` each time: the registry is the one place)."""
    return {name: t.planner for name, t in TECHNIQUES.items() if t.planner is not None}


Planner = Callable[[Analysis, Any], list[Edit]]


@dataclass
class Plan:
    model: str
    edits: list[Edit]
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    recipe: dict[str, Any] = field(default_factory=dict)
    empty: list[str] = field(default_factory=list)  # requested sections that found no site

    def partial(self) -> list[str]:
        """Why this plan does less than the recipe asked: techniques with no site, modules
        skipped unread. Empty when the plan is complete."""
        out = [f"{section}: no site found in {self.model}" for section in self.empty]
        # A skipped forward known to hold no site (a detector's box bookkeeping) loses nothing.
        unread = [s for s in self.skipped if not s.known]
        if unread:
            listed = "; ".join(f"{s.module} ({s.reason})" for s in unread[:3])
            more = f" and {len(unread) - 3} more" if len(unread) > 3 else ""
            out.append(
                f"{len(unread)} module(s) could not be read as graphs, their own code was "
                f"not analysed: {listed}{more}"
            )
        return out

    def by_kind(self, kind: str) -> list[Edit]:
        return [e for e in self.edits if e.kind == kind]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "edits": [e.to_dict() for e in self.edits],
            "skipped": [s.to_dict() for s in self.skipped],
            "notes": list(self.notes),
            "partial": self.partial(),
            "recipe": self.recipe,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for e in self.edits:
            counts[e.kind] = counts.get(e.kind, 0) + 1
        parts = [f"{n} {k}" for k, n in counts.items()] or ["no edits"]
        for name, technique in TECHNIQUES.items():
            mine = self.by_kind(name)
            if mine and technique.summary is not None:
                parts += technique.summary(mine)
        if self.skipped:
            known = sum(1 for s in self.skipped if s.known)
            which = f", {known} of them known to hold no site" if known else ""
            parts.append(f"{len(self.skipped)} module(s) not traceable (see skipped{which})")
        return f"{self.model}: " + ", ".join(parts)

    def table(self) -> str:
        """A readable table per technique (rendered by :mod:`retrofit.report`)."""
        from retrofit.report import plan_table

        return plan_table(self)

    def __str__(self) -> str:
        return self.table()


def plan(
    model: nn.Module,
    recipe: Recipe | dict | str | None,
    *,
    example_input: Any = None,
    analysis: Analysis | None = None,
) -> Plan:
    """What ``apply`` would do to ``model`` with ``recipe``, without doing it.

    Works on the meta device: tracing and site finding need no weights. ``example_input`` is the
    probe a forward that cannot be traced with its defaults is recorded on (default: a random
    batch of the model's input size). Never changes the model; may be called any number of times.
    """
    recipe = load_recipe(recipe)
    # Full collections would walk every object of the process to free nothing (see
    # young_objects_only): reading a model is most of a plan's time, as of apply's.
    with young_objects_only(), trace_session(model):
        return _plan(model, recipe, analysis or Analysis(model, example_input))


def _plan(model: nn.Module, recipe: Recipe, analysis: Analysis) -> Plan:
    if not analysis.traced.parts:
        reasons = "; ".join(f"{s.module}: {s.reason}" for s in analysis.traced.skipped)
        raise TraceError(f"no part of {type(model).__name__} could be read as a graph ({reasons})")
    edits: list[Edit] = []
    notes: list[str] = []
    empty: list[str] = []
    for section, planner in planners().items():
        spec = getattr(recipe, section, None)
        if spec is None:
            continue
        found = planner(analysis, spec)
        if not found:
            notes.append(f"{section}: no sites found in {type(model).__name__}")
            empty.append(section)
        edits.extend(found)
    for section, technique in TECHNIQUES.items():
        # A technique without edits (Cutout acts on the input images) says what it will do.
        spec = getattr(recipe, section, None)
        if spec is not None and technique.note is not None:
            notes.append(technique.note(spec))
    return Plan(
        model=type(model).__name__,
        edits=edits,
        skipped=list(analysis.traced.skipped),
        notes=notes,
        recipe=recipe.to_dict(),
        empty=empty,
    )
