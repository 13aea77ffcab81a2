"""A Plan as text: one table per technique, with the columns that technique's paper talks about.

Each technique's record renders its own (``Technique.table``, in ``retrofit/techniques/``):
stochastic depth shows each block's depth l and survival p_l (Huang et al. 2016); DropBlock the
stage, block_size and keep_prob (Ghiasi et al. 2018); Uout its beta (Li et al. 2019); the
dropout fix what it removes and where it puts the one dropout it keeps; Cutout, which edits the
input batches and not the model, is one line. A technique without a table of its own gets the
generic one. Only a Plan's public fields are read (``edits`` with ``kind``, ``module``, ``node``,
``action``, ``target``, ``depth``, ``survival``, ``block``, ``params``, ``source``, ``note``;
``skipped``, ``notes``, ``model``), so planning and printing stay apart.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from retrofit.techniques import TECHNIQUES
from retrofit.techniques.table import num, short_source, table, where

__all__ = ["plan_table", "short_source"]


def _generic(edits: Sequence[Any], model: str) -> list[str]:
    rows = [
        (
            where(e, model),
            e.node,
            e.action + (f" {e.target}" if e.target else ""),
            ", ".join(f"{k}={num(v)}" for k, v in e.params.items()),
            short_source(e.source),
            e.note or "",
        )
        for e in edits
    ]
    header = ("module", "node", "action", "params", "source", "note")
    return [f"{edits[0].kind}: {len(edits)} edit(s)", *table(header, rows)]


def _renderer(kind: str) -> Callable[[Sequence[Any], str], list[str]]:
    technique = TECHNIQUES.get(kind)
    return technique.table if technique is not None and technique.table else _generic


def plan_table(plan: Any) -> str:
    """The plan as text: a table per technique in plan order, then skipped modules, the plan's
    notes (Cutout's line among them) and its one-line summary."""
    by_kind: dict[str, list[Any]] = {}
    for e in plan.edits:
        by_kind.setdefault(e.kind, []).append(e)
    out: list[str] = []
    for kind, edits in by_kind.items():
        if out:
            out.append("")
        out += _renderer(kind)(edits, plan.model)
    if out and (plan.skipped or plan.notes):
        out.append("")
    out += [
        f"skipped {s.module}: {s.reason}" + (f" (nothing lost: {s.known})" if s.known else "")
        for s in plan.skipped
    ]
    out += list(plan.notes)
    summary = getattr(plan, "summary", None)
    if callable(summary):
        out.append(summary())
    return "\n".join(out)
