"""Outlining: the branch region of a residual add (``analysis/branch.py``) copied into a graph of
its own, the function a batch-mode gate calls only when it keeps the block (Huang et al. 2016:
a dropped block costs nothing).
"""

from __future__ import annotations

import torch.fx as fx

from retrofit.analysis.branch import BranchRegion

__all__ = ["extract_branch"]


def extract_branch(region: BranchRegion, env: dict[fx.Node, fx.Node] | None = None) -> fx.Graph:
    """A new graph computing the branch from ``region.inputs`` (placeholders, in that order).

    ``env``, if given, receives each region node's copy: a branch that holds an already
    outlined site (a decoder's ``up(h) + skip`` where ``h = x + res(x)``) carries that site's
    gate call, whose branch the rewrite must then attach to the copy, not the erased original.
    """
    graph = fx.Graph()
    env = {} if env is None else env
    for node in region.inputs:
        env[node] = graph.placeholder(node.name)
    for node in region.attrs:
        env[node] = graph.get_attr(str(node.target))
    for node in region.nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[region.branch])
    return graph
