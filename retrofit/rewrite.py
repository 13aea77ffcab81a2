"""Execute a Plan on a model, in place, keeping the model itself.

Every edit is made on the smallest module that owns its site, and nothing else changes:

* module swaps (a drop-path ``nn.Identity`` placeholder → a gate, a misplaced Dropout → Uout) and
  rate changes of existing regularizers touch only that child;
* graph edits (a gate on a residual branch, DropBlock after a stage) re-trace the owner's own
  ``forward`` with every child as a leaf, edit that small graph, generate Python from it and
  install it as the owner's *instance* ``forward``. The owner keeps its class, methods, hooks and
  children; the root model keeps ``forward_features``, ``reset_classifier``, ``pretrained_cfg``.

The owner is traced twice, in training and in eval mode, and the installed forward dispatches on
``self.training``: fx bakes ``self.training`` reads (``F.dropout(x, p, self.training)``) into the
graph as constants, and a single trace would freeze one mode into both.

Outlining (stochastic depth in batch/subset mode, action ``"outline"``): in the *training* graph
only, the residual branch's nodes (:func:`retrofit.graph.outline.branch_region`) move into a
function of their inputs, generated like the forward and bound to the owner; the add becomes
``gate(shortcut, *inputs)`` and the gate calls the branch only when it keeps it. The eval graph
gets the plain gate on the branch operand (identity, or ×p_l for paper scaling), so eval
equivalence — what ``verify`` proves — is the same as for the mask form. A site the analysis
refuses falls back to the mask form, and the edit says so in its note.

Inserted modules hold no parameters or buffers, so ``state_dict`` keys and values are unchanged.
Everything done is recorded on the touched module (``_retrofit_state``), which is how
:func:`strip` undoes it exactly and how applying twice leaves one gate per site.
"""

from __future__ import annotations

import inspect
import itertools
import linecache
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from retrofit.fixes import dropout_fix_layer, uout_layer
from retrofit.graph.dataflow import locate
from retrofit.graph.outline import BranchRegion, NotOutlinable, branch_region, extract_branch
from retrofit.graph.trace import default_args, is_passthrough, trace_graph
from retrofit.layers import StochasticDepthGate
from retrofit.layers.stochastic_depth import Outline
from retrofit.placement import dropblock_layer
from retrofit.plan import Edit, Plan

__all__ = ["LAYER_FACTORIES", "RewriteError", "applied_plan", "is_retrofitted", "rewrite", "strip"]

_STATE = "_retrofit_state"
_PLAN = "_retrofit_plan"
_GRAPH_ACTIONS = ("wrap_arg", "insert_after", "replace_call", "outline")
_counter = itertools.count()


class RewriteError(RuntimeError):
    """A planned edit could not be made (the owner's code no longer matches the plan)."""


@dataclass
class _State:
    """What retrofit changed on one module, so that strip can undo exactly that."""

    added: list[str] = field(default_factory=list)
    replaced: dict[str, nn.Module] = field(default_factory=dict)
    rates: dict[str, Any] = field(default_factory=dict)
    forward: bool = False


def _state(module: nn.Module) -> _State:
    state = module.__dict__.get(_STATE)
    if state is None:
        state = _State()
        module.__dict__[_STATE] = state
    return state


def _gate(edit: Edit) -> nn.Module:
    return StochasticDepthGate(
        survival=edit.survival if edit.survival is not None else 1.0,
        mode=edit.params.get("mode", "row"),
        scaling=edit.params.get("scaling", "inverted"),
        depth=edit.depth,
        seed=edit.params.get("seed"),
        warmup=edit.params.get("warmup", 0.0),
        # Names the site for seeded draws: unique per site (a transformer block's two gates
        # share a depth but draw independently) and the same in every process.
        stream=f"{edit.module}:{edit.key}:{edit.ordinal}",
    )


# kind → factory building the module an edit inserts. Techniques register theirs here.
LAYER_FACTORIES: dict[str, Callable[[Edit], nn.Module]] = {
    "stochastic_depth": _gate,
    "dropblock": dropblock_layer,
    "uout": uout_layer,
    "dropout_fix": dropout_fix_layer,
}

# Existing regularizers whose rate a stochastic-depth edit sets instead of adding a gate:
# type name → (attribute holding the drop probability, extra attributes to set).
_RATE_ATTRS: dict[str, tuple[str, dict[str, Any]]] = {
    "DropPath": ("drop_prob", {"scale_by_keep": True}),
    "StochasticDepth": ("p", {"mode": "row"}),
}


def _layer(edit: Edit, parent: nn.Module) -> nn.Module:
    try:
        factory = LAYER_FACTORIES[edit.kind]
    except KeyError:
        raise RewriteError(f"no layer registered for edit kind {edit.kind!r}") from None
    # A new module starts in training mode; in a model already in eval() it must not.
    return factory(edit).train(parent.training)


def _split(name: str) -> tuple[str, str]:
    parent, _, attr = name.rpartition(".")
    return parent, attr


def _set_rate(model: nn.Module, edit: Edit) -> None:
    module = model.get_submodule(edit.target or "")
    attr, extra = _RATE_ATTRS[type(module).__name__]
    state = _state(module)
    for name, value in {attr: 1.0 - float(edit.survival or 1.0), **extra}.items():
        state.rates.setdefault(name, getattr(module, name))
        setattr(module, name, value)


def _neutralise_slot(model: nn.Module, edit: Edit) -> None:
    """An outlined site whose branch ends in timm's DropPath / torchvision's StochasticDepth:
    set that module's rate to 0 (undone by strip), so the gate is the only stochastic depth."""
    module = model.get_submodule(edit.target or "")
    spec = _RATE_ATTRS.get(type(module).__name__)
    if spec is None:
        return  # an nn.Identity placeholder is neutral already
    state = _state(module)
    state.rates.setdefault(spec[0], getattr(module, spec[0]))
    setattr(module, spec[0], 0.0)


def _replace_module(model: nn.Module, edit: Edit) -> None:
    parent_name, attr = _split(edit.target or "")
    parent = model.get_submodule(parent_name)
    state = _state(parent)
    state.replaced.setdefault(attr, getattr(parent, attr))
    setattr(parent, attr, _layer(edit, parent))


def _same(value: Any, default: Any) -> bool:
    if value is default:
        return True
    if isinstance(value, torch.Tensor) or type(value) is not type(default):
        return False
    return value == default


def _compile(graph: fx.Graph, label: str) -> Callable[..., Any]:
    """Python source of ``graph`` as a function of ``self`` (the owner, not a GraphModule)."""
    code = graph.python_code(root_module="self")
    filename = f"<retrofit {label} #{next(_counter)}>"
    # Registered with linecache so tracebacks through the generated forward show its code.
    linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)
    namespace = dict(code.globals)
    exec(compile(code.src, filename, "exec"), namespace)
    return namespace["forward"]


def _fall_back(edit: Edit, reason: str) -> None:
    """An outline the owner's graph does not allow: the gate masks the branch instead."""
    edit.action = "wrap_arg"
    note = f"not outlined ({reason}): the branch is masked, no compute saved"
    edit.note = f"{edit.note}; {note}" if edit.note else note


def _wrap_arg(graph: fx.Graph, node: fx.Node, edit: Edit, name: str) -> None:
    assert edit.arg is not None
    with graph.inserting_before(node):
        new = graph.create_node("call_module", name, (node.args[edit.arg],))
    node.update_arg(edit.arg, new)


def _edit_graph(
    graph: fx.Graph,
    edits: list[tuple[Edit, str]],
    *,
    training: bool = False,
    modules: dict[str, nn.Module] | None = None,
) -> list[tuple[str, fx.Graph, BranchRegion]]:
    """Make ``edits`` on ``graph``; return the branches outlined (training graph only).

    ``modules``: the owner's named modules, which the outline analysis reads (``inplace=True``).
    """
    located = [(edit, name, locate(graph, edit.key, edit.ordinal)) for edit, name in edits]
    for edit, _, node in located:
        src = node.meta.get("source")
        if edit.source and src and src != edit.source:
            raise RewriteError(
                f"{edit.kind} edit in {edit.module or '<root>'}: node {edit.node} re-traced at {src}, "
                f"planned at {edit.source}"
            )
    outlines = []
    for edit, name, node in located:
        action = edit.action
        if action == "outline":
            if training:
                outlines.append((edit, name, node))
                continue
            action = "wrap_arg"  # eval: the gate is the identity (or ×p_l) on the branch
        if action == "wrap_arg":
            _wrap_arg(graph, node, edit, name)
        elif action == "insert_after":
            with graph.inserting_after(node):
                new = graph.create_node("call_module", name, (node,))
            node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
        elif action == "replace_call":
            with graph.inserting_before(node):
                new = graph.create_node("call_module", name, (node.args[0],))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
    # Outlining comes last, so nodes the other edits inserted inside a branch (a DropBlock) move
    # with it; in execution order, so a branch holding an earlier outlined site calls its gate.
    position = {n: i for i, n in enumerate(graph.nodes)}
    outlined = []
    for edit, name, add in sorted(outlines, key=lambda t: position[t[2]]):
        assert edit.arg is not None
        subset = edit.params.get("mode") == "subset"
        try:
            region = branch_region(graph, add, edit.arg, modules=modules or {}, subset=subset)
        except NotOutlinable as e:
            _fall_back(edit, str(e))
            _wrap_arg(graph, add, edit, name)
            continue
        branch = extract_branch(region)
        with graph.inserting_before(add):
            call = graph.create_node("call_module", name, (region.shortcut, *region.inputs))
        call.meta.update({k: v for k, v in add.meta.items() if k in ("source", "owner_local")})
        add.replace_all_uses_with(call)
        graph.erase_node(add)
        for node in reversed(region.nodes):
            graph.erase_node(node)
        outlined.append((name, branch, region))
    graph.lint()
    return outlined


def _copy(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph()
    new.output(new.graph_copy(graph, {}))
    return new


def _install_forward(owner: nn.Module, name: str, edits: list[tuple[Edit, str]]) -> None:
    if is_passthrough(owner):
        raise RewriteError(
            f"{name or '<root>'} is a plain nn.Sequential: it has no forward code of its own to "
            "insert a layer into (wrap the model in a module with a forward)"
        )
    original = type(owner).forward
    signature = inspect.signature(original)
    if any(
        p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        for p in signature.parameters.values()
    ):
        raise RewriteError(f"{name or '<root>'}: forward(*args/**kwargs) cannot be rewritten")
    params = list(signature.parameters)[1:]
    concrete = default_args(owner)
    functions = {}
    modules = dict(owner.named_modules())
    pristine: fx.Graph | None = None
    for training in (True, False):
        if pristine is not None:
            graph = _copy(pristine)  # the forward never read self.training: one trace serves both
        else:
            saved = owner.training
            owner.training = training  # only the owner's own flag: its children are leaves here
            try:
                graph, read_training = trace_graph(owner, shallow=True)
            finally:
                owner.training = saved
            if not read_training:
                pristine = _copy(graph)
        outlined = _edit_graph(graph, edits, training=training, modules=modules)
        label = f"{type(owner).__name__}.forward {name or '<root>'}"
        functions[training] = _compile(graph, f"{label} {'train' if training else 'eval'}")
        for attr, branch_graph, region in outlined:
            branch = _compile(branch_graph, f"{label} branch of {attr}")
            # Bound to the owner and held by the gate, registered nowhere: the owner already
            # owns the branch's modules (state_dict and parameters() are unchanged).
            getattr(owner, attr).outline(
                types.MethodType(branch, owner),
                Outline(region.batched, region.inplace, region.copy_dropped),
            )
    traced = [p for p in params if p not in concrete]
    train_fn, eval_fn = functions[True], functions[False]

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not kwargs and len(args) == len(traced):
            return (train_fn if self.training else eval_fn)(self, *args)
        bound = signature.bind(self, *args, **kwargs)
        for param, default in concrete.items():
            if param in bound.arguments and not _same(bound.arguments[param], default):
                # The rewrite specialised this argument to its default; honour the caller.
                return original(self, *args, **kwargs)
        values = [bound.arguments.get(p, signature.parameters[p].default) for p in traced]
        return (train_fn if self.training else eval_fn)(self, *values)

    owner.forward = forward.__get__(owner)  # instance attribute: the class is untouched
    _state(owner).forward = True


def rewrite(model: nn.Module, plan: Plan) -> nn.Module:
    """Make every edit of ``plan`` on ``model`` (in place) and return it."""
    graph_edits: dict[str, list[Edit]] = {}
    for edit in plan.edits:
        if edit.action == "set_rate":
            _set_rate(model, edit)
        elif edit.action == "replace_module":
            _replace_module(model, edit)
        elif edit.action in _GRAPH_ACTIONS:
            if edit.action == "outline" and edit.target:
                _neutralise_slot(model, edit)
            graph_edits.setdefault(edit.module, []).append(edit)
        else:
            raise RewriteError(f"unknown edit action {edit.action!r}")
    for owner_name, edits in graph_edits.items():
        owner = model.get_submodule(owner_name)
        state = _state(owner)
        named = []
        for edit in edits:
            attr = f"retrofit_{edit.kind}{len(state.added)}"
            owner.add_module(attr, _layer(edit, owner))
            state.added.append(attr)
            named.append((edit, attr))
        _install_forward(owner, owner_name, named)
    model.__dict__[_PLAN] = plan
    return model


def is_retrofitted(model: nn.Module) -> bool:
    return any(_STATE in m.__dict__ for m in model.modules())


def applied_plan(model: nn.Module) -> Plan | None:
    """The plan last applied to ``model`` (None if it is not retrofitted)."""
    return model.__dict__.get(_PLAN)


def strip(model: nn.Module) -> nn.Module:
    """Undo every retrofit edit: the original architecture, same object, same weights.

    The result's ``state_dict`` loads into a fresh instance of the original class with
    ``strict=True`` (it always could: inserted modules hold no state), and its forward is the
    class's own again.
    """
    for module in list(model.modules()):
        state: _State | None = module.__dict__.pop(_STATE, None)
        if state is None:
            continue
        if state.forward:
            module.__dict__.pop("forward", None)
        for attr in state.added:
            delattr(module, attr)
        for attr, original in state.replaced.items():
            setattr(module, attr, original)
        for attr, value in state.rates.items():
            setattr(module, attr, value)
    model.__dict__.pop(_PLAN, None)
    return model
