"""An owner's own graph, cut from the whole-model trace instead of traced again.

A rewrite edits the forward of the module that owns a site, traced with its children as leaves
(``trace_graph(owner, shallow=True, call=...)``). The whole-model trace has already run that
forward: its nodes are in the model's graph, between the owner's call and its return, with the
children's calls traced through. Each module call the whole-model tracer traced through is
recorded as a :class:`Region` (its arguments and output as proxies, the nodes it made, whether
its own code read ``self.training``), and :func:`cut` turns the owner's region back into the
graph a shallow trace gives: placeholders for the call's proxies, every child's region folded
into one ``call_module`` node, targets and module stacks relative to the owner.

This saves the owner trace (one fx trace per owner, a fifth of ``apply`` on a small model) and,
when no owner needs one, the recording forward's hooks. A cut is made only where it is exactly
the shallow graph's equal; anything else returns None and the owner is traced as before:

* the part was traced symbolically (a specialised part answered Python's questions about
  proxies for its own call, which the owner's call may not share);
* the owner's code read ``self.training`` in eval mode (the graph is the eval branch);
* the call ran no hooks and the owner has no forward of its own instance (a shallow trace
  reads the class's ``forward`` alone);
* every value the owner's nodes read is its own, an argument's, a parameter or buffer of its
  subtree, or a child call's single output;
* each child is a module of the owner's subtree, called on proxies and plain constants,
  returning one proxy that it made.

``tests/test_regions.py`` holds cut and traced graphs equal, node for node, on the zoo's owners.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten

from retrofit.capture.calls import Call, CallKey
from retrofit.capture.structure import PLAIN_CONSTANTS

__all__ = ["OUTPUT_CONSTANTS", "Region", "Regions", "cut", "plain_call"]

# Non-tensor values a specialised forward may return (rebuilt from the graph as constants).
OUTPUT_CONSTANTS = (type(None), bool, int, float, str, torch.dtype)


@dataclass
class Region:
    """One call of a module that the tracer traced through (not a leaf, not a pass-through).

    ``name``: qualified in the traced part. ``start``: the last node before the call; ``end``:
    the call's last node (``start`` when it made none). ``stack``: the ``nn_module_stack`` at the
    call (the modules around it), ``source``: its call site. ``read_training``: the module's own
    code read ``self.training``, whose value was ``training``. ``plain``: the call ran the
    class's forward and nothing else (:func:`plain_call`).
    """

    name: str
    module: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any
    start: fx.Node
    end: fx.Node
    stack: dict[str, tuple[str, type]]
    source: str | None
    read_training: bool
    training: bool
    plain: bool


class Regions(list):
    """A trace's regions, kept with its graph. A copy of the graph module gets none (its graph's
    nodes are other objects): cut then declines, and the owner is traced."""

    def __deepcopy__(self, memo: dict) -> Regions:
        return Regions()

    def __reduce__(self) -> tuple[type, tuple]:
        return Regions, ()


def plain_call(module: nn.Module) -> bool:
    """Whether calling ``module`` runs its class's ``forward`` and nothing else: no forward hooks
    (its own or global ones, which ``__call__`` runs and a trace of ``forward`` does not), no
    forward set on the instance."""
    hooks = nn.modules.module
    return not (
        module._forward_pre_hooks
        or module._forward_hooks
        or hooks._global_forward_pre_hooks
        or hooks._global_forward_hooks
        or "forward" in module.__dict__
    )


class _NotCut(Exception):
    """The owner's region is not exactly a shallow trace's graph: trace it instead."""


def cut(graph: fx.Graph, regions: list[Region], owner: str, leaf_names: Any) -> Any:
    """The shallow, training-mode graph of ``owner`` (qualified in the part ``graph`` was traced
    from), as :class:`retrofit.capture.trace.Traced` fields ``(graph, read_training, key,
    out_spec)``; None where it cannot be cut exactly (module docstring).

    ``leaf_names(fn, call, count)``: the placeholder names a specialised trace gives.
    """
    region = next((r for r in regions if r.name == owner), None)
    if region is None or not region.plain or (region.read_training and not region.training):
        return None
    try:
        return _cut(graph, regions, region, leaf_names)
    except _NotCut:
        return None


def _relative(name: str, owner: str) -> str:
    if not name.startswith(owner + "."):
        raise _NotCut(f"{name} is not in {owner}'s subtree")
    return name[len(owner) + 1 :]


def _stack(stack: dict[str, tuple[str, type]] | None, owner: str) -> dict[str, tuple[str, type]]:
    """The entries below ``owner``, named relative to it (a shallow trace's stack)."""
    out: dict[str, tuple[str, type]] = {}
    for qual, cls in (stack or {}).values():
        if qual.startswith(owner + "."):
            rel = qual[len(owner) + 1 :]
            key, n = rel, 1
            while key in out:
                key, n = f"{rel}@{n}", n + 1
            out[key] = (rel, cls)
    return out


def _cut(graph: fx.Graph, regions: list[Region], region: Region, leaf_names: Any) -> Any:
    owner = region.name
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    lo, hi = index[region.start], index[region.end]
    # The children: the outermost regions inside the owner's (its pass-through containers have
    # none: their members' calls are the owner's, as in a shallow trace).
    children: dict[int, Region] = {}
    covered = -1
    inner = [r for r in regions if r is not region and lo <= index[r.start] and index[r.end] <= hi]
    for r in sorted(inner, key=lambda r: (index[r.start], -index[r.end])):
        a, b = index[r.start], index[r.end]
        if a < covered:  # inside a child already folded
            continue
        if a == b or r.name == owner or not r.plain:
            raise _NotCut("a child call that made no node or ran hooks, or the owner's again")
        if a in children:
            raise _NotCut("two child calls start at one node")
        _relative(r.name, owner)
        children[a] = r
        covered = b

    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    attrs: dict[str, fx.Node] = {}

    def resolve(n: fx.Node) -> fx.Node:
        mapped = env.get(n)
        if mapped is not None:
            return mapped
        if n.op == "get_attr":  # made before the call (a parameter read earlier): its own here
            target = _relative(str(n.target), owner)
            if target not in attrs:
                attrs[target] = g.get_attr(target)
            return attrs[target]
        raise _NotCut(f"{n.name} is read from outside the owner's call")

    def value(v: Any) -> Any:
        if isinstance(v, fx.Proxy):
            return resolve(v.node)
        if isinstance(v, tuple | list):
            return type(v)(value(x) for x in v)
        if isinstance(v, dict):
            return {k: value(x) for k, x in v.items()}
        if isinstance(v, PLAIN_CONSTANTS):  # passed to the child as they are
            return v
        raise _NotCut(f"a child is passed a {type(v).__name__}")

    # Placeholders: the call's proxies, in pytree order, as a specialised trace names them.
    leaves, spec = tree_flatten((region.args, region.kwargs))
    names = leaf_names(type(region.module).forward, Call(region.args, region.kwargs), len(leaves))
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, fx.Proxy):
            if leaf.node in env:
                raise _NotCut("one proxy passed as two arguments")
            env[leaf.node] = g.placeholder(names[i])
        elif isinstance(leaf, torch.Tensor):
            raise _NotCut("a real tensor argument")
    key = CallKey(
        spec,
        tuple(None if isinstance(v, fx.Proxy) else v for v in leaves),
        tuple(isinstance(v, fx.Proxy) for v in leaves),
        "none",
    )

    i = lo + 1
    while i <= hi:
        child = children.get(i - 1)
        if child is not None:
            out = child.output
            if (
                not isinstance(out, fx.Proxy)
                or not index[child.start] < index[out.node] <= index[child.end]
            ):
                raise _NotCut(f"{child.name} returns other than one proxy of its own")
            call = g.create_node(
                "call_module",
                _relative(child.name, owner),
                value(child.args),
                value(child.kwargs),
            )
            call.meta["source"] = child.source
            stack = _stack(child.stack, owner)
            rel = _relative(child.name, owner)
            stack[rel if rel not in stack else f"{rel}@call"] = (rel, type(child.module))
            call.meta["nn_module_stack"] = stack
            env[out.node] = call
            i = index[child.end] + 1
            continue
        n = nodes[i]
        if n.op in ("call_module", "get_attr"):
            target = _relative(str(n.target), owner)
        elif n.op in ("call_function", "call_method"):
            target = n.target
        else:
            raise _NotCut(f"a {n.op} node inside a call")
        new = g.create_node(
            n.op, target, fx.node.map_arg(n.args, resolve), fx.node.map_arg(n.kwargs, resolve)
        )
        if n.op == "get_attr":
            attrs.setdefault(target, new)
        new.meta["source"] = n.meta.get("source")
        if "nn_module_stack" in n.meta:
            stack = _stack(n.meta["nn_module_stack"], owner)
            if stack:
                new.meta["nn_module_stack"] = stack
        env[n] = new
        i += 1

    out_leaves, out_spec = tree_flatten(region.output)
    flat = []
    for leaf in out_leaves:
        if isinstance(leaf, fx.Proxy):
            flat.append(resolve(leaf.node))
        elif isinstance(leaf, OUTPUT_CONSTANTS):
            flat.append(leaf)
        else:
            raise _NotCut(f"the forward returns a {type(leaf).__name__}")
    g.output(tuple(flat))
    return g, region.read_training, key, out_spec
