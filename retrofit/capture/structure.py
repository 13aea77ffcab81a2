"""A hashable key of an fx graph's structure: two graphs with equal keys generate the same code
and answer the rewrite's and the analyses' questions alike (the blocks of a stage, once cut or
traced, have one key). What shares work by it: generated code (``rewrite/execute.py``) and the
outline check (``analysis/context.py``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

__all__ = ["PLAIN_CONSTANTS", "graph_key"]

# Constants compared by type and value (their text in generated code is their repr).
PLAIN_CONSTANTS = (
    type(None), bool, int, float, str, torch.dtype, torch.device, torch.memory_format
)  # fmt: skip


class _Unkeyed(Exception):
    pass


def graph_key(graph: fx.Graph, *, meta: bool = False) -> tuple[Any, ...] | None:
    """Everything fx's code generation reads of ``graph``, hashable: per node its op, name,
    type, target (a function by identity: the cached code's globals hold it, so the identity
    is not reused while the entry lives) and arguments (nodes by position, constants by type
    and value); with ``meta``, also what the edits read (each node's source line and owner).
    None when an argument is not a plain constant (its text in the code is its repr, which
    need not tell two objects apart)."""
    if type(graph._codegen) is not fx.graph.CodeGen:
        return None  # a pytree codegen: more state than the nodes
    index: dict[fx.Node, int] = {}

    def plain(v: Any) -> Any:
        if isinstance(v, fx.Node):
            return ("%", index[v])
        if isinstance(v, tuple | list):
            return (type(v).__name__, *map(plain, v))
        if isinstance(v, dict):
            return ("dict", *((k, plain(x)) for k, x in v.items()))
        if isinstance(v, slice):
            return ("slice", plain(v.start), plain(v.stop), plain(v.step))
        if isinstance(v, PLAIN_CONSTANTS) or v is Ellipsis:
            return (type(v), v)
        raise _Unkeyed

    items: list[Any] = []
    try:
        for i, n in enumerate(graph.nodes):
            target = n.target if isinstance(n.target, str) else id(n.target)
            items.append((n.op, n.name, repr(n.type), target, plain(n.args), plain(n.kwargs)))
            if meta:
                items.append((n.meta.get("source"), n.meta.get("owner_local")))
            index[n] = i
    except _Unkeyed:
        return None
    return tuple(items)
