"""The residual branch of an add as a region of its owner's graph: what outlining it would move.

Stochastic depth saves compute only if a dropped branch is not computed (Huang et al. 2016;
DINOv2's subset variant, Oquab et al. 2023, computes it on the kept rows only). In the owner's
shallow graph (children are leaves) the rewrite moves the branch's nodes into a function of
their inputs and lets the gate call it. This module decides, without editing anything, which
nodes that is and whether moving them is safe.

The region of ``add(shortcut, branch)`` is every node whose value is needed by the branch
operand *and by nothing else*: the nodes that become dead once the add stops reading the branch.
That is the branch operand's exclusive ancestry, so it never contains the shortcut's path (the
identity, or a downsample projection), nor a value the model also uses after the add. Parameters
and buffers read by the region (``get_attr``) are re-read inside the outlined function rather
than passed in, so the gate's inputs are activations and plain values only.

An add is not outlined (the rewrite falls back to multiplying the branch by the mask, which is
always correct and saves nothing) when doing so could change what the model computes:

* the add has ``alpha=`` or ``out=``: not a plain residual sum;
* the branch operand is also used elsewhere: nothing could be skipped;
* a node of the region mutates one of its inputs in place: skipping the branch would skip a
  side effect the rest of the model sees;
* subset mode, and the region reads a value computed from a tensor's shape outside it (a batch
  size ``B`` taken before the branch): on the kept rows that value would be wrong.
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch.fx as fx

from retrofit.capture.concrete import is_metadata

__all__ = ["BranchRegion", "NotOutlinable", "branch_region", "module_inplace", "mutated_input"]

_INPLACE_OPERATORS = {
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.ifloordiv,
    operator.imod,
    operator.ipow,
    operator.iand,
    operator.ior,
    operator.ixor,
    operator.ilshift,
    operator.irshift,
    operator.imatmul,
    operator.setitem,
}
# Ops whose result shares storage with their first argument: an in-place op on the result
# mutates the argument too.
_VIEW_METHODS = {
    "view",
    "view_as",
    "reshape",
    "reshape_as",
    "flatten",
    "unflatten",
    "transpose",
    "permute",
    "squeeze",
    "unsqueeze",
    "expand",
    "expand_as",
    "narrow",
    "select",
    "unbind",
    "split",
    "chunk",
    "movedim",
    "as_strided",
    "detach",
    "__getitem__",
}
_VIEW_FUNCTIONS = {operator.getitem}


class NotOutlinable(Exception):
    """Why an add's branch cannot be outlined (the message is the reason, for the plan)."""


@dataclass
class BranchRegion:
    add: fx.Node
    branch: fx.Node
    shortcut: fx.Node
    nodes: list[fx.Node]  # topological order, ends with ``branch``
    inputs: list[fx.Node]  # values from outside the region, in first-use order
    attrs: list[fx.Node]  # get_attr nodes the region reads (re-read inside the function)
    batched: tuple[bool, ...]  # per input: depends on the module's input (has the batch dim)
    inplace: str  # "shortcut" | "branch" | ""
    copy_dropped: bool


@lru_cache(maxsize=512)
def _inplace_param(target: Any) -> inspect.Signature | None:
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    return sig if "inplace" in sig.parameters else None


def mutated_input(node: fx.Node, modules: dict[str, Any]) -> fx.Node | None:
    """The argument ``node`` writes to in place (``x.relu_()``, ``x += y`` spelled ``iadd``,
    ``F.relu(x, inplace=True)``, an ``nn.ReLU(inplace=True)`` call or a parameter-free wrapper
    module holding one), else None."""
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if first is None:
        return None
    if node.op == "call_method":
        name = str(node.target)
        return first if name.endswith("_") and not name.startswith("_") else None
    if node.op == "call_module":
        module = modules.get(str(node.target))
        return first if module is not None and module_inplace(module) else None
    if node.op == "call_function":
        if node.target in _INPLACE_OPERATORS:
            return first
        if node.kwargs.get("inplace") is True:
            return first
        sig = _inplace_param(node.target)
        if sig is not None:
            try:
                bound = sig.bind_partial(*node.args, **node.kwargs)
            except TypeError:
                return None
            return first if bound.arguments.get("inplace") is True else None
    return None


def module_inplace(module: Any) -> bool:
    """Whether calling ``module`` may write its input in place: its own ``inplace=True``, or a
    wrapper without parameters (an activation wrapper, a Sequential of activations) holding a
    module with ``inplace=True``. A module with parameters computes new tensors before any
    in-place op of its children (conv → BN → ``ReLU(inplace=True)``), so its children's in-place
    ops do not reach its input."""
    if getattr(module, "inplace", False) is True:
        return True
    if not hasattr(module, "modules") or next(module.parameters(), None) is not None:
        return False
    return any(getattr(m, "inplace", False) is True for m in module.modules())


def _is_view(node: fx.Node) -> bool:
    if node.op == "call_method":
        return str(node.target) in _VIEW_METHODS
    return node.op == "call_function" and node.target in _VIEW_FUNCTIONS


def _may_be_mutated(node: fx.Node, modules: dict[str, Any], skip: fx.Node | None = None) -> bool:
    """Whether ``node``'s value (or a view of it) is written in place later or leaves the module."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        for user in n.users:
            if user is skip:
                continue
            if user.op == "output" or mutated_input(user, modules) is n:
                return True
            if _is_view(user):
                stack.append(user)
    return False


def _is_inplace_add(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target == "add_"
    return node.op == "call_function" and node.target is operator.iadd


def _input_dependent(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value depends on the module's inputs through data (a shape read cuts it)."""
    dependent: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or (
            not is_metadata(node) and any(a in dependent for a in node.all_input_nodes)
        ):
            dependent.add(node)
    return dependent


def _reads_shape(node: fx.Node, dependent: set[fx.Node], memo: dict[fx.Node, bool]) -> bool:
    """A value computed from an input-dependent tensor's metadata (``x.shape[0]``, ``x.size(1)``)."""
    if node in memo:
        return memo[node]
    memo[node] = False
    found = (is_metadata(node) and node.all_input_nodes[0] in dependent) or any(
        _reads_shape(a, dependent, memo) for a in node.all_input_nodes if a not in dependent
    )
    memo[node] = found
    return found


def branch_region(
    graph: fx.Graph,
    add: fx.Node,
    branch_arg: int,
    *,
    modules: dict[str, Any] | None = None,
    subset: bool = False,
) -> BranchRegion:
    """The outlinable branch region of residual ``add`` in the owner's shallow ``graph``.

    ``modules`` maps the graph's ``call_module`` targets to modules (the owner's
    ``named_modules()``), to see which calls work in place.

    Raises:
        NotOutlinable: with the reason (see the module docstring).
    """
    branch, shortcut = _operands(add, branch_arg)
    modules = modules or {}
    ordered = _exclusive_nodes(graph, add, branch)
    inputs, attrs = _region_inputs(ordered, modules)
    dependent = _input_dependent(graph)
    batched = tuple(n in dependent for n in inputs)
    if subset:
        _check_no_outside_shapes(inputs, batched, dependent)
    inplace = ""
    if _is_inplace_add(add):
        inplace = "branch" if branch_arg == 0 else "shortcut"
    copy_dropped = inplace != "shortcut" and (
        _may_be_mutated(add, modules) or _may_be_mutated(shortcut, modules, skip=add)
    )
    return BranchRegion(
        add=add,
        branch=branch,
        shortcut=shortcut,
        nodes=ordered,
        inputs=inputs,
        attrs=attrs,
        batched=batched,
        inplace=inplace,
        copy_dropped=copy_dropped,
    )


def _operands(add: fx.Node, branch_arg: int) -> tuple[fx.Node, fx.Node]:
    """(branch, shortcut) of a plain two-operand residual sum computed inside the module."""
    if len(add.args) != 2 or add.kwargs:
        raise NotOutlinable("the add has alpha= or out= (not a plain residual sum)")
    branch, shortcut = add.args[branch_arg], add.args[1 - branch_arg]
    if not isinstance(branch, fx.Node) or not isinstance(shortcut, fx.Node) or branch is shortcut:
        raise NotOutlinable("the add's operands are not two distinct values")
    if branch.op in ("placeholder", "get_attr"):
        raise NotOutlinable(f"the branch {branch.name} is computed outside the module")
    return branch, shortcut


def _exclusive_nodes(graph: fx.Graph, add: fx.Node, branch: fx.Node) -> list[fx.Node]:
    """The nodes only the branch needs, in graph order: walking back from the add, a node
    joins when every user is in the region already (the branch itself: the add or the region)."""
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    region: set[fx.Node] = set()
    for node in reversed(nodes[: position[add]]):
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        users = list(node.users)
        if node is branch:
            exclusive = all(u is add or u in region for u in users)
        else:
            exclusive = bool(users) and all(u in region for u in users)
        if exclusive:
            region.add(node)
    if branch not in region:
        raise NotOutlinable(f"the branch's result {branch.name} is also used elsewhere")
    return [n for n in nodes if n in region]


def _region_inputs(
    ordered: list[fx.Node], modules: dict[str, Any]
) -> tuple[list[fx.Node], list[fx.Node]]:
    """The values the region reads from outside it: computed ones (the outlined function's
    inputs) and attributes; refuses a region that writes an outside value in place."""
    region = set(ordered)
    inputs: list[fx.Node] = []
    attrs: list[fx.Node] = []
    for node in ordered:
        changed = mutated_input(node, modules)
        if changed is not None and changed not in region and changed.op != "get_attr":
            raise NotOutlinable(
                f"{node.name} writes {changed.name} in place, a value from outside the branch"
            )
        for arg in node.all_input_nodes:
            if arg in region:
                continue
            bucket = attrs if arg.op == "get_attr" else inputs
            if arg not in bucket:
                bucket.append(arg)
    return inputs, attrs


def _check_no_outside_shapes(
    inputs: list[fx.Node], batched: tuple[bool, ...], dependent: set[fx.Node]
) -> None:
    """Subset mode runs the branch on the kept rows: an input computed outside the branch from
    a batched tensor's shape (a batch size) would describe the full batch."""
    memo: dict[fx.Node, bool] = {}
    for node, flag in zip(inputs, batched, strict=True):
        if not flag and _reads_shape(node, dependent, memo):
            raise NotOutlinable(
                f"the branch reads {node.name}, computed from a tensor's shape outside it "
                "(on the kept rows only it would be wrong)"
            )
