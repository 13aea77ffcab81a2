"""The pieces every technique's plan table is made of (``retrofit.report`` lays them out)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["depth_cells", "mean", "num", "short_source", "survival_span", "table", "where"]

Row = tuple[str, ...]


def short_source(source: str | None) -> str:
    """``package/file.py:line``: the last two path parts, enough to open the file."""
    if not source:
        return ""
    path, _, line = source.rpartition(":")
    return "/".join(path.split("/")[-2:]) + ":" + line


def table(header: Row, rows: Sequence[Row], indent: str = "  ") -> list[str]:
    """Left-aligned columns; the last column is not padded (it may be long)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    widths[-1] = 0

    def line(cells: Row) -> str:
        return indent + "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return [line(header), *(line(r) for r in rows)]


def where(edit: Any, model: str) -> str:
    """The forward that is edited: the owner module, or the model's own forward for the root."""
    return edit.module or f"{model}.forward"


def num(value: Any) -> str:
    return (
        f"{value:g}"
        if isinstance(value, (int, float)) and not isinstance(value, bool)
        else str(value)
    )


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def survival_span(edits: Sequence[Any]) -> str:
    """``; p_l from 0.9750 down to 0.5000``: the range of a depth rule's survivals (Huang et al.
    2016's linear decay), or "" when no edit carries one."""
    survival = [e.survival for e in edits if e.survival is not None]
    return f"; p_l from {max(survival):.4f} down to {min(survival):.4f}" if survival else ""


def depth_cells(e: Any) -> Row:
    """A residual-site edit's first columns: its depth l, its survival p_l and its block."""
    return (
        "" if e.depth is None else str(e.depth),
        "" if e.survival is None else f"{e.survival:.4f}",
        e.block or e.module or "<root>",
    )
