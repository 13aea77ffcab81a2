"""Sums of several terms: ``((a + b) + c) + d`` read as one sum, and regrouped around one term.

A re-parameterisable block (RepVGG, Ding et al. 2021; MobileOne, Vasu et al. 2023) sums an
identity (BatchNorm) branch and several parallel conv-BN branches, and the order the code adds
them in is the author's choice: timm's byobnet ``MobileOneBlock`` adds the identity last (``out =
Σ conv(x); out = drop_path(out) + identity(x)``), smp's port and timm's fastvit add it first
(``out = scale(x) + identity(x); for conv in convs: out += conv(x)``). Identity-first, no single
add has the whole branch as an operand, so a gate on "the branch operand" cannot exist until the
sum is regrouped as ``identity + (scale + Σ conv)``.

:func:`sum_terms` reads the chain of adds ending at one add (pure, any association, ``+=``
included); :func:`regroup_sum` rewrites it, on a graph its caller owns (the rewrite's working
copy of an owner's graph, or a copy made for the outline check), so that the add reads
``shortcut + (the other terms summed in their order)``. Regrouping re-associates a float sum:
the result differs in its last bits (~5e-7 relative), which a deep net can amplify, so the
rewrite regroups only its training graph (one draw gates the whole branch; batch mode calls it
as one function) and, in eval, gates each branch term where the author's chain reads it.
"""

from __future__ import annotations

import operator
from typing import Any

import torch.fx as fx

from retrofit.analysis.dataflow import is_add

__all__ = ["SumChain", "regroup_sum", "sum_terms"]


def _plain(node: fx.Node) -> bool:
    """A two-operand add without ``alpha=``/``out=``."""
    return is_add(node) and len(node.args) == 2 and not node.kwargs


def _in_place(node: fx.Node) -> bool:
    return node.target in (operator.iadd, "add_")


class SumChain:
    """The terms of the chain of adds ending at ``add`` and its inner adds (see
    :func:`sum_terms`)."""

    def __init__(self, add: fx.Node, terms: list[Any], inner: list[fx.Node]) -> None:
        self.add = add
        self.terms = terms  # fx.Nodes and constants (smp's ``identity_out = 0``), in order
        self.inner = inner  # the adds folded into ``add``, topological order

    @property
    def nodes(self) -> list[fx.Node]:
        return [t for t in self.terms if isinstance(t, fx.Node)]


def sum_terms(add: fx.Node) -> SumChain | None:
    """The chain of adds that ends at ``add``, flattened: an operand that is itself a plain add
    of the same module's code, read by nothing else, is a partial sum and its operands are terms.

    None when ``add`` is not a plain add, or when an add of the chain writes one of its terms in
    place (``out = identity(x); out += conv(x)`` with an ``nn.Identity``: the regrouped sum
    would stop mutating ``x``). An in-place add on a partial sum writes a temporary: harmless.
    """
    if not _plain(add):
        return None
    owner = add.meta.get("owner_local", "")
    terms: list[Any] = []
    inner: list[fx.Node] = []

    def partial(value: Any) -> bool:
        return (
            isinstance(value, fx.Node)
            and _plain(value)
            and len(value.users) == 1
            and value.meta.get("owner_local", "") == owner
        )

    def visit(node: fx.Node) -> bool:
        if _in_place(node) and not partial(node.args[0]):
            return False
        for value in node.args:
            if partial(value):
                inner.append(value)
                if not visit(value):
                    return False
            else:
                terms.append(value)
        return True

    if not visit(add):
        return None
    position = {n: i for i, n in enumerate(add.graph.nodes)}
    return SumChain(add, terms, sorted(inner, key=position.__getitem__))


def regroup_sum(graph: fx.Graph, add: fx.Node, shortcut_term: int) -> fx.Node:
    """Rewrite the sum ending at ``add`` as ``shortcut + branch``, where the shortcut is term
    ``shortcut_term`` (constant terms stay with it) and the branch is every other term summed in
    its order; returns the new add (operand 1 is the branch), which takes ``add``'s place.

    Raises:
        ValueError: ``add`` does not end a sum with such a term (the graph is unchanged).
    """
    chain = sum_terms(add)
    if chain is None or not 0 <= shortcut_term < len(chain.terms):
        raise ValueError(f"{add.name} does not end a sum with a term #{shortcut_term}")
    shortcut = chain.terms[shortcut_term]
    branch_terms = [t for i, t in enumerate(chain.terms) if i != shortcut_term]
    constants = [t for t in branch_terms if not isinstance(t, fx.Node)]
    branch_terms = [t for t in branch_terms if isinstance(t, fx.Node)]
    if not isinstance(shortcut, fx.Node) or not branch_terms:
        raise ValueError(f"{add.name}: term #{shortcut_term} is not a shortcut around a branch")
    meta = {k: v for k, v in add.meta.items() if k in ("source", "owner_local")}

    def plus(a: Any, b: Any) -> fx.Node:
        node = graph.call_function(operator.add, (a, b))
        node.meta.update(meta)
        return node

    with graph.inserting_before(add):
        for constant in constants:
            shortcut = plus(shortcut, constant)
        branch = branch_terms[0]
        for term in branch_terms[1:]:
            branch = plus(branch, term)
        new = plus(shortcut, branch)
    add.replace_all_uses_with(new)
    graph.erase_node(add)
    for node in reversed(chain.inner):
        graph.erase_node(node)
    return new
