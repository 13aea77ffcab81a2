"""A Plan as text: one table per technique, with the columns that technique's paper talks about.

Stochastic depth shows each block's depth l and survival p_l (Huang et al. 2016); DropBlock the
stage, block_size and keep_prob (Ghiasi et al. 2018); Uout its beta (Li et al. 2019); the
dropout fix what it removes and where it puts the one dropout it keeps; Cutout, which edits the
input batches and not the model, is one line. A technique without a table of its own gets the
generic one. Only a Plan's public fields are read (``edits`` with ``kind``, ``module``, ``node``,
``action``, ``target``, ``depth``, ``survival``, ``block``, ``params``, ``source``, ``note``;
``skipped``, ``notes``, ``model``), so planning and printing stay apart.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["plan_table", "short_source"]

Row = tuple[str, ...]


def short_source(source: str | None) -> str:
    """``package/file.py:line``: the last two path parts, enough to open the file."""
    if not source:
        return ""
    path, _, line = source.rpartition(":")
    return "/".join(path.split("/")[-2:]) + ":" + line


def _table(header: Row, rows: Sequence[Row], indent: str = "  ") -> list[str]:
    """Left-aligned columns; the last column is not padded (it may be long)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    widths[-1] = 0

    def line(cells: Row) -> str:
        return indent + "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return [line(header), *(line(r) for r in rows)]


def _where(edit: Any, model: str) -> str:
    """The forward that is edited: the owner module, or the model's own forward for the root."""
    return edit.module or f"{model}.forward"


def _num(value: Any) -> str:
    return (
        f"{value:g}"
        if isinstance(value, (int, float)) and not isinstance(value, bool)
        else str(value)
    )


# --- one renderer per technique ---------------------------------------------------------------

_SD_ACTIONS = {
    "wrap_arg": "gate on the branch",
    "outline": "gate; branch skipped when dropped",
    "replace_module": "gate in slot {target}",
    "set_rate": "rate set on {target}",
}


def _stochastic_depth(edits: Sequence[Any], model: str) -> list[str]:
    survival = [e.survival for e in edits if e.survival is not None]
    params = edits[0].params
    blocks = len({e.block for e in edits})
    head = (
        f"stochastic depth (Huang et al. 2016): {len(edits)} residual branch(es) in {blocks} "
        f"block(s), mode {params.get('mode', '?')}, scaling {params.get('scaling', '?')}"
    )
    if survival:
        head += f"; p_l from {max(survival):.4f} down to {min(survival):.4f}"
    rows = [
        (
            "" if e.depth is None else str(e.depth),
            "" if e.survival is None else f"{e.survival:.4f}",
            e.block or e.module or "<root>",
            _SD_ACTIONS.get(e.action, e.action).format(target=e.target),
            short_source(e.source),
            e.note or "",
        )
        for e in edits
    ]
    return [head, *_table(("l", "p_l", "block", "action", "source", "note"), rows)]


_STAGE = re.compile(r"\bstage (\d+)")


def _dropblock(edits: Sequence[Any], model: str) -> list[str]:
    params = edits[0].params
    ramp = params.get("ramp")
    head = f"DropBlock (Ghiasi et al. 2018): {len(edits)} layer(s)"
    targets = {e.params.get("keep_prob") for e in edits}
    if len(targets) == 1:
        head += f", keep_prob ramps from 1 to {_num(targets.pop())}"
        if isinstance(ramp, (int, float)):
            head += f" over the first {ramp:.0%} of training"
    if params.get("per_channel"):
        head += ", a mask per channel"
    rows = []
    for e in edits:
        # The stage index is in the planner's note ("after stage 3 (layer3, reduction 16)"); the
        # rest of the note (a clamped block_size, a stage without blocks) stays in the last column.
        note = e.note or ""
        stage = _STAGE.search(note)
        rest = "; ".join(part for part in note.split("; ") if not part.startswith("after "))
        rows.append(
            (
                stage.group(1) if stage else "",
                e.target or e.node,
                _num(e.params.get("block_size", "")),
                _num(e.params.get("keep_prob", "")),
                _where(e, model),
                short_source(e.source),
                rest,
            )
        )
    header = ("stage", "after", "block_size", "keep_prob", "inserted in", "source", "note")
    return [head, *_table(header, rows)]


def _replaced(edit: Any) -> str:
    if edit.action == "replace_module":
        return edit.target or edit.node
    return f"{edit.module or '<root>'}:{edit.node}"


def _uout(edits: Sequence[Any], model: str) -> list[str]:
    betas = {e.params.get("beta") for e in edits}
    head = f"Uout (Li et al. 2019): replaces {len(edits)} dropout(s) that reach a BatchNorm"
    if len(betas) == 1:
        head += f", y = x + x·r with r ~ U(−{_num(next(iter(betas)))}, {_num(next(iter(betas)))})"
    rows = [
        (
            _replaced(e),
            _num(e.params.get("beta", "")),
            short_source(e.source),
            e.note or "",
        )
        for e in edits
    ]
    return [head, *_table(("replaces", "beta", "source", "why"), rows)]


def _dropout_fix(edits: Sequence[Any], model: str) -> list[str]:
    removed = [e for e in edits if e.params.get("role") == "remove"]
    added = [e for e in edits if e.params.get("role") == "insert"]
    head = (
        f"dropout fix after_last_bn (Li et al. 2019): removes {len(removed)} dropout(s) that "
        f"reach a BatchNorm, adds {len(added)} after the last one"
    )
    rows = []
    for e in edits:
        if e.params.get("role") == "insert":
            what = f"add Dropout(p={_num(e.params.get('p'))})"
            where = e.target or f"{_where(e, model)}:{e.node}"
        else:
            what, where = "remove", _replaced(e)
        rows.append((what, where, short_source(e.source), e.note or ""))
    return [head, *_table(("action", "module / call", "source", "note"), rows)]


def _generic(edits: Sequence[Any], model: str) -> list[str]:
    rows = [
        (
            _where(e, model),
            e.node,
            e.action + (f" {e.target}" if e.target else ""),
            ", ".join(f"{k}={_num(v)}" for k, v in e.params.items()),
            short_source(e.source),
            e.note or "",
        )
        for e in edits
    ]
    header = ("module", "node", "action", "params", "source", "note")
    return [f"{edits[0].kind}: {len(edits)} edit(s)", *_table(header, rows)]


RENDERERS: dict[str, Callable[[Sequence[Any], str], list[str]]] = {
    "stochastic_depth": _stochastic_depth,
    "dropblock": _dropblock,
    "uout": _uout,
    "dropout_fix": _dropout_fix,
}


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
        out += RENDERERS.get(kind, _generic)(edits, plan.model)
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
