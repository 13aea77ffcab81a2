"""Data-flow facts over one fx graph: ancestry, input dependence, compute weight, node locators.

A small pure pass (in the spirit of ``torch.fx.passes.shape_prop``): it reads a graph and answers
questions about it, and never edits it. Ancestor sets are Python ints used as bitsets indexed by
topological position, so "common ancestors of a and b" is one ``&``.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from retrofit.capture.concrete import is_metadata

__all__ = ["DataFlow", "is_add", "locate", "node_key"]

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}

# Calls that carry learned or input-dependent linear maps: what makes a branch "heavy".
_MATMUL_FUNCTIONS = {
    F.linear,
    F.conv1d,
    F.conv2d,
    F.conv3d,
    F.conv_transpose1d,
    F.conv_transpose2d,
    F.conv_transpose3d,
    F.scaled_dot_product_attention,
    torch.matmul,
    torch.bmm,
    torch.mm,
    torch.einsum,
    torch.baddbmm,
    torch.addmm,
    operator.matmul,
}
_MATMUL_METHODS = {"matmul", "bmm", "mm", "__matmul__"}


def is_add(node: fx.Node) -> bool:
    """An addition of two values: ``a + b``, ``a += b``, ``torch.add``, ``Tensor.add(_)``."""
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        return True
    return node.op == "call_method" and node.target in _ADD_METHODS


def _is_map(param: torch.Tensor | None) -> bool:
    """A weight matrix or kernel (two or more non-singleton dims), not a per-channel scale:
    a layer scale shaped (1, C, 1, 1) multiplies, it does not mix."""
    return param is not None and sum(1 for d in param.shape if d > 1) >= 2


def _module_weight(module: nn.Module) -> tuple[int, bool]:
    """Learned maps inside a leaf module (convs, linears, attention projections), and whether
    one of them is dense (mixes channels: a linear, or a conv with groups=1)."""
    count = 0
    dense = False
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            count += 1
            # groups=1 over one input channel (CSATv2's position encoding) mixes nothing either
            dense = dense or (m.groups == 1 and m.in_channels > 1)
        elif isinstance(m, nn.Linear):
            count += 1
            dense = True
        elif isinstance(m, nn.MultiheadAttention):
            count += 2  # in-projection and out-projection
            dense = True
    if count == 0 and any(_is_map(p) for p in module.parameters(recurse=True)):
        count, dense = 1, True  # a custom layer with a weight matrix of its own
    return count, dense


def node_key(node: fx.Node) -> str:
    """A name for "the same operation" that survives re-tracing the owning module on its own.

    Adds of every spelling share one key, module calls are keyed by the called module's name
    relative to the owner, functions and methods by their name.
    """
    if is_add(node):
        return "add"
    if node.op == "call_module":
        owner = node.meta.get("owner_local", "")
        target = str(node.target)
        return "module:" + (
            target[len(owner) + 1 :] if owner and target.startswith(owner + ".") else target
        )
    if node.op == "call_function":
        return "function:" + getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return "method:" + str(node.target)
    return node.op


def locate(graph: fx.Graph, key: str, ordinal: int) -> fx.Node:
    """The ``ordinal``-th node (0-based, topological order) of ``graph`` with ``node_key == key``."""
    seen = 0
    for node in graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        if node_key(node) == key:
            if seen == ordinal:
                return node
            seen += 1
    raise LookupError(f"no node #{ordinal} with key {key!r} in the re-traced graph")


@dataclass
class DataFlow:
    """Ancestry and weights of every node of one graph."""

    graph_module: fx.GraphModule
    order: dict[fx.Node, int]
    nodes: list[fx.Node]
    ancestors: list[int]  # bitset of strict-or-self ancestors through data edges
    inputs_mask: int  # bitset of placeholders
    weights: list[int]
    weighted_mask: int
    dense_mask: int  # nodes with a dense learned map (channel mixing), see _module_weight

    @classmethod
    def of(cls, gm: fx.GraphModule) -> DataFlow:
        nodes = list(gm.graph.nodes)
        order = {n: i for i, n in enumerate(nodes)}
        ancestors: list[int] = []
        weights: list[int] = []
        inputs_mask = 0
        weighted_mask = 0
        dense_mask = 0
        modules = dict(gm.named_modules())
        params = {name: p for name, p in gm.named_parameters()}
        for i, node in enumerate(nodes):
            bit = 1 << i
            anc = bit
            if not is_metadata(node):
                for inp in node.all_input_nodes:
                    anc |= ancestors[order[inp]]
            ancestors.append(anc)
            if node.op == "placeholder":
                inputs_mask |= bit
            # A weight reshaped or standardised on its own (timm's StdConv2d) is not a map
            # applied to data: only ops that see the input can carry weight.
            w, dense = cls._weight(node, modules, params) if anc & inputs_mask else (0, False)
            weights.append(w)
            if w:
                weighted_mask |= bit
            if dense:
                dense_mask |= bit
        return cls(gm, order, nodes, ancestors, inputs_mask, weights, weighted_mask, dense_mask)

    @staticmethod
    def _weight(node: fx.Node, modules: dict[str, nn.Module], params: dict) -> tuple[int, bool]:
        if node.op == "call_module":
            module = modules.get(str(node.target))
            return _module_weight(module) if module is not None else (0, False)
        if node.op == "call_function" and node.target in _MATMUL_FUNCTIONS:
            groups = node.kwargs.get("groups", node.args[6] if len(node.args) > 6 else 1)
            return 1, groups == 1
        if node.op == "call_method" and node.target in _MATMUL_METHODS:
            return 1, True
        if node.op in ("call_function", "call_method"):
            # A wrapped function fed weight tensors (torchvision's shifted_window_attention gets
            # qkv and proj weights): one learned map per weight matrix it is given.
            n = sum(
                1
                for a in node.all_input_nodes
                if a.op == "get_attr" and _is_map(params.get(str(a.target)))
            )
            return n, n > 0
        return 0, False

    def depends_on_input(self, node: fx.Node) -> bool:
        return bool(self.ancestors[self.order[node]] & self.inputs_mask)

    def anc(self, node: fx.Node) -> int:
        return self.ancestors[self.order[node]]

    def bits(self, mask: int) -> Iterator[int]:
        while mask:
            low = mask & -mask
            yield low.bit_length() - 1
            mask ^= low

    def weight(self, region: int) -> int:
        return sum(self.weights[i] for i in self.bits(region & self.weighted_mask))

    def depth(self, region: int) -> int:
        """Longest chain of weighted operations inside ``region`` (parallel branches count once)."""
        best: dict[int, int] = {}
        longest = 0
        for i in self.bits(region):  # ascending = topological order
            node = self.nodes[i]
            before = max((best.get(self.order[p], 0) for p in node.all_input_nodes), default=0)
            best[i] = before + self.weights[i]
            longest = max(longest, best[i])
        return longest

    def region_nodes(self, region: int) -> list[fx.Node]:
        return [self.nodes[i] for i in self.bits(region)]
