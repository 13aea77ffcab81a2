"""Execute a Plan on a model, in place, keeping the model itself.

Every edit is made on the smallest module that owns its site, and nothing else changes:

* module swaps (a drop-path ``nn.Identity`` placeholder → a gate, a misplaced Dropout → Uout) and
  rate changes of existing regularizers touch only that child;
* graph edits (a gate on a residual branch, DropBlock after a stage) give the owner a new
  *instance* ``forward``: a :class:`RetrofitForward` that runs the owner's own code, re-traced
  with its children as leaves and edited. The owner keeps its class, methods, hooks and
  children; the root model keeps ``forward_features``, ``reset_classifier``, ``pretrained_cfg``.

**Specialised on the real call.** The owner's code is traced on the call it actually receives,
not with its arguments frozen at their defaults (``capture/calls.py``, ``capture/trace.py``): a
block called as ``block(x, drop_connect_rate=0.2)`` or ``block(x, state)`` gets a graph for that
call. Each specialisation records what it assumed (the arguments' structure and non-tensor
values, tensor ranks or shapes where the code branched on them, and the training flag when the
code read it); a call it does not match is traced anew, on that call, the first time it happens
(as TorchDynamo guards and recompiles). So a gate is never skipped because a caller passed an
argument the trace did not expect, which is what made gates silently dead before.

fx bakes ``self.training`` reads into the graph; a forward that read it is specialised per mode.
Outlining (stochastic depth in batch/subset mode, action ``"outline"``): in the *training* graph
only, the residual branch's nodes (:func:`retrofit.analysis.branch.branch_region`) move into a
function of their inputs, generated like the forward and passed to the gate on every call:
``gate(shortcut, *inputs, branch=f, outline=spec)``. A branch the analysis refuses is masked
instead, and the rewrite's record (:class:`Rewrite`) says so; the plan is never edited.

**Eval runs the code as written.** Every layer retrofit inserts into a graph is the identity in
eval (``retrofit.layers.protocol.EvalIdentity``) except a stochastic-depth gate with the paper's
test-time ×p_l. An owner whose edits only insert such layers (no call replaced) runs its class's
own forward in eval mode: bit-identical to the original, with no gate overhead. Otherwise the
eval graph gets the plain gate on the branch operand (×p_l). Verification runs the edited eval
code either way (:func:`edited_eval`), under the techniques' eval-neutral context: it is the
graph the training forward is made from, so the comparison with the original checks the capture.

Inserted modules hold no parameters or buffers, so ``state_dict`` keys and values are unchanged.
Everything done is recorded on the touched module (``_retrofit_state``), which is how
:func:`strip` undoes it exactly and how applying twice leaves one gate per site. The installed
forward pickles and deep-copies with the model: it keeps the edits, not the generated code, and
specialises again on its first call.
"""

from __future__ import annotations

import collections
import functools
import itertools
import linecache
import types
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from retrofit.analysis.branch import NotOutlinable, branch_region, module_inplace
from retrofit.analysis.dataflow import locate, node_key
from retrofit.analysis.sums import regroup_sum, sum_terms
from retrofit.capture.calls import Call, CallKey
from retrofit.capture.existing import drop_rate_attribute
from retrofit.capture.structure import graph_key
from retrofit.capture.trace import Traced, is_passthrough, trace_graph
from retrofit.edit import ACTIONS
from retrofit.errors import RewriteError
from retrofit.layers.protocol import Outline
from retrofit.layers.slots import unwatch_slot, watch_slot
from retrofit.plan import Edit, Plan
from retrofit.rewrite.outline import extract_branch
from retrofit.techniques import TECHNIQUES

__all__ = [
    "Rewrite",
    "RewriteError",
    "RetrofitForward",
    "applied_plan",
    "edited_eval",
    "is_retrofitted",
    "rewrite",
    "strip",
]

_STATE = "_retrofit_state"
_PLAN = "_retrofit_plan"
_counter = itertools.count()


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


@dataclass
class Rewrite:
    """What a rewrite did (the plan is the request; this is the record).

    ``inserted``/``replaced``: qualified names of the modules it added or swapped in;
    ``reused``: existing regularizers whose rate it set. Every one of them must be called by a
    training forward (``retrofit.verify.check_live``). ``forwards``: owners given a
    :class:`RetrofitForward`.
    """

    inserted: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    forwards: list[str] = field(default_factory=list)
    edits: dict[str, Edit] = field(default_factory=dict)  # module name → the edit it serves

    def live(self) -> dict[str, str]:
        """The modules a training forward must call, each with the site it serves."""
        out = {}
        for name in [*self.inserted, *self.replaced, *self.reused]:
            edit = self.edits[name]
            where = f" at {edit.source}" if edit.source else ""
            out[name] = f"{edit.kind} in {edit.module or '<root>'}, node {edit.node}{where}"
        return out


def _layer(edit: Edit, parent: nn.Module) -> nn.Module:
    technique = TECHNIQUES.get(edit.kind)
    factory = technique.layer if technique is not None else None
    if factory is None:
        raise RewriteError(f"no layer registered for edit kind {edit.kind!r}")
    # A new module starts in training mode; in a model already in eval() it must not.
    return factory(edit).train(parent.training)


def _split(name: str) -> tuple[str, str]:
    parent, _, attr = name.rpartition(".")
    return parent, attr


def _set_rate(model: nn.Module, edit: Edit, rate: float) -> None:
    module = model.get_submodule(edit.target or "")
    spec = drop_rate_attribute(module)
    if spec is None:
        raise RewriteError(f"{edit.target}: {type(module).__name__} has no drop rate to set")
    attr, extra = spec
    state = _state(module)
    for name, value in {attr: rate, **extra}.items():
        state.rates.setdefault(name, getattr(module, name))
        setattr(module, name, value)


def _replace_module(model: nn.Module, edit: Edit) -> None:
    parent_name, attr = _split(edit.target or "")
    parent = model.get_submodule(parent_name)
    state = _state(parent)
    state.replaced.setdefault(attr, getattr(parent, attr))
    setattr(parent, attr, _layer(edit, parent))


def _reuse_rate(model: nn.Module, edit: Edit) -> None:
    """The ``set_rate`` action: the existing regularizer takes the rate, and is watched."""
    _set_rate(model, edit, 1.0 - float(edit.survival or 1.0))
    # The slot draws its own masks: count what it keeps, for the statistics.
    slot = model.get_submodule(edit.target or "")
    attr = drop_rate_attribute(slot)
    assert attr is not None
    watch_slot(slot, attr[0], edit.depth, edit.survival or 1.0, edit.kind)


# How each module action of retrofit.edit.ACTIONS is made (no graph edit).
_MODULE_EDITS: dict[str, Callable[[nn.Module, Edit], None]] = {
    "replace_module": _replace_module,
    "set_rate": _reuse_rate,
}


def _function(src: str, scope: dict[str, Any], label: str) -> Callable[..., Any]:
    """The ``forward`` defined by generated ``src``, run with the globals ``scope``."""
    filename = f"<retrofit {label} #{next(_counter)}>"
    # Registered with linecache so tracebacks through the generated forward show its code.
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    namespace = dict(scope)
    exec(_compiled(src), namespace)
    forward = namespace["forward"]
    # Named after this owner, not the first one that generated the same source.
    forward.__code__ = forward.__code__.replace(co_filename=filename)
    return forward


# Generated code by graph structure (``graph_key``), most recent last: the blocks of a stage
# have the same graph, and fx's code generation (~0.5 ms for a 20-node block) is most of what
# specialising a forward costs. Bounded like ``_compiled``.
_SOURCES: collections.OrderedDict[tuple[Any, ...], fx.graph.PythonCode] = collections.OrderedDict()


def clear_caches() -> None:
    """Forget the generated code of earlier rewrites (``tools/bench_core.py`` measures what an
    apply costs the first time a process sees a model)."""
    _SOURCES.clear()
    _TEMPLATES.clear()
    _compiled.cache_clear()


def _python_code(graph: fx.Graph) -> fx.graph.PythonCode:
    """``graph.python_code(root_module="self")``, generated once per graph structure."""
    key = graph_key(graph)
    if key is None:
        return graph.python_code(root_module="self")
    code = _SOURCES.get(key)
    if code is None:
        code = _SOURCES[key] = graph.python_code(root_module="self")
        if len(_SOURCES) > 512:
            _SOURCES.popitem(last=False)
    else:
        _SOURCES.move_to_end(key)
    return code


@dataclass(frozen=True)
class _Template:
    """One specialisation's generated code, for every owner whose graph, edits, in-place
    children and mode are the same (the blocks of a stage): ``branches`` per outlined gate,
    its branch's code, the global of ``code`` that passes the bound branch, and its spec."""

    code: fx.graph.PythonCode
    branches: tuple[tuple[str, fx.graph.PythonCode, str, Outline], ...]
    masked: dict[str, str]
    # The functions the key names by identity (an edit may have removed one from the code):
    # held, so that no other object takes one's id while the entry lives.
    targets: tuple[Any, ...] = ()


_TEMPLATES: collections.OrderedDict[tuple[Any, ...], _Template] = collections.OrderedDict()


def _template_key(
    traced: Traced, edits: list[tuple[Edit, str]], training: bool, modules: dict[str, nn.Module]
) -> tuple[Any, ...] | None:
    """What the edits of ``_edit_graph`` read: the owner's graph (with sources and owners),
    the edits, the mode, and which called modules work in place (the outline analysis's only
    question about modules, ``retrofit.analysis.branch``)."""
    graph = traced.graph
    structure = traced.structure()
    if structure is None:
        return None
    edits_key = tuple(
        (e.kind, e.action, e.key, e.ordinal, e.source, e.arg, e.regroup, attr)
        + (bool(getattr(e.settings, "subset", False)),)
        for e, attr in edits
    )
    inplace = tuple(
        module_inplace(modules[str(n.target)]) if str(n.target) in modules else None
        for n in graph.nodes
        if n.op == "call_module"
    )
    return (structure, edits_key, training, inplace)


@functools.lru_cache(maxsize=512)
def _compiled(src: str) -> types.CodeType:
    """``src`` compiled, once per text: the blocks of a stage generate the same source (what
    differs between them, their constants, is in the globals each is run with), and compiling
    is a third of the time of making a rewritten forward."""
    return compile(src, "<retrofit>", "exec")


def _locate(graph: fx.Graph, edit: Edit) -> fx.Node:
    """The edit's node in a re-traced graph: by key and ordinal, checked against the source
    line; when a specialisation has more or fewer nodes of that key, by key and source line."""
    try:
        node: fx.Node | None = locate(graph, edit.key, edit.ordinal)
    except LookupError:
        node = None
    if node is not None and (not edit.source or node.meta.get("source") in (None, edit.source)):
        return node
    if edit.source:
        same = [
            n
            for n in graph.nodes
            if n.op not in ("placeholder", "output", "get_attr")
            and node_key(n) == edit.key
            and n.meta.get("source") == edit.source
        ]
        if len(same) == 1:
            return same[0]
    found = f" (found at {node.meta.get('source')})" if node is not None else ""
    raise LookupError(
        f"{edit.kind} site {edit.node} ({edit.key} #{edit.ordinal}, planned at "
        f"{edit.source or 'unknown source'}) is not in this call's graph{found}"
    )


def _wrap_arg(graph: fx.Graph, node: fx.Node, edit: Edit, name: str) -> None:
    assert edit.arg is not None
    with graph.inserting_before(node):
        new = graph.create_node("call_module", name, (node.args[edit.arg],))
    node.update_arg(edit.arg, new)


def _constant(value: Any) -> Callable[[], Any]:
    def retrofit_constant() -> Any:
        return value

    return retrofit_constant


@dataclass
class _Outlined:
    gate: str
    branch: fx.Graph
    spec: Outline
    call: fx.Node


def _insert_after(graph: fx.Graph, node: fx.Node, edit: Edit, name: str) -> None:
    with graph.inserting_after(node):
        new = graph.create_node("call_module", name, (node,))
    node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)


def _replace_call(graph: fx.Graph, node: fx.Node, edit: Edit, name: str) -> None:
    with graph.inserting_before(node):
        new = graph.create_node("call_module", name, (node.args[0],))
    node.replace_all_uses_with(new)
    graph.erase_node(node)


# How each graph action of retrofit.edit.ACTIONS is made on a located node (outline: below).
_GRAPH_EDITS: dict[str, Callable[[fx.Graph, fx.Node, Edit, str], None]] = {
    "wrap_arg": _wrap_arg,
    "insert_after": _insert_after,
    "replace_call": _replace_call,
}


def _edit_graph(
    graph: fx.Graph,
    edits: list[tuple[Edit, str]],
    *,
    training: bool,
    modules: dict[str, nn.Module],
) -> tuple[list[_Outlined], dict[str, str]]:
    """Make ``edits`` on ``graph``: the branches outlined (training graph only), and per gate
    the reason a planned outline was masked instead.

    ``modules``: the owner's named modules, which the outline analysis reads (``inplace=True``).
    """
    located = [(edit, name, _locate(graph, edit)) for edit, name in edits]
    if training:
        located = _regrouped(graph, located)
    outlines = []
    for edit, name, node in located:
        action = edit.action
        if action == "outline":
            if training:
                outlines.append((edit, name, node))
                continue
            action = "wrap_arg"  # eval: the gate is the identity (or ×p_l) on the branch
        if action == "wrap_arg" and edit.regroup is not None and not training:
            _wrap_terms(graph, node, edit, name)
            continue
        _GRAPH_EDITS[action](graph, node, edit, name)
    # Outlining comes last, so nodes the other edits inserted inside a branch (a DropBlock) move
    # with it; in execution order, so a branch holding an earlier outlined site calls its gate.
    position = {n: i for i, n in enumerate(graph.nodes)}
    outlined: list[_Outlined] = []
    masked: dict[str, str] = {}
    for edit, name, add in sorted(outlines, key=lambda t: position[t[2]]):
        try:
            outlined.append(_outline(graph, add, edit, name, modules, outlined))
        except NotOutlinable as e:
            masked[name] = str(e)
            _wrap_arg(graph, add, edit, name)
    graph.lint()
    return outlined, masked


def _regrouped(
    graph: fx.Graph, located: list[tuple[Edit, str, fx.Node]]
) -> list[tuple[Edit, str, fx.Node]]:
    """The located edits, each sum a ``regroup`` edit names regrouped first as ``shortcut +
    branch`` (once per add: two edits at one site share it), the edit then at the new add.

    Training graph only: one draw must gate the whole branch, and a batch-mode gate must call
    it as one function. The eval graph keeps the author's order of summation (``_wrap_terms``).
    """
    done: dict[fx.Node, fx.Node] = {}
    out = []
    for edit, name, node in located:
        if edit.regroup is not None:
            if node not in done:
                try:
                    done[node] = regroup_sum(graph, node, edit.regroup)
                except ValueError as e:
                    raise LookupError(f"{edit.kind} site {edit.node}: {e}") from e
            node = done[node]
        out.append((edit, name, node))
    return out


def _wrap_terms(graph: fx.Graph, add: fx.Node, edit: Edit, name: str) -> None:
    """``wrap_arg`` on a sum of several terms in the eval graph: the layer on each branch term,
    where its chain of adds reads it, the sum left in the author's order.

    In eval a gate is a fixed linear map (the identity, or ×p_l for paper scaling; ShakeDrop's
    expectation), so gating each term is gating their sum, and under inverted scaling the eval
    output is the original's bit for bit: re-associated (``identity + (scale + Σ conv)``), a
    float sum differs in its last bits (~5e-7 relative), which a deep net can amplify past
    verification's tolerance: smp's ``Unet(mobileone_s0)``, untrained, reaches activations of
    ~1e5 and its regrouped eval output differed by up to 0.11 (refused by ``verify``).
    """
    chain = sum_terms(add)
    shortcut = edit.regroup
    if chain is None or shortcut is None or not 0 <= shortcut < len(chain.terms):
        raise LookupError(f"{edit.kind} site {edit.node}: not a sum with a term #{shortcut}")
    keep = chain.terms[shortcut]
    for node in [*chain.inner, add]:
        for i, value in enumerate(node.args):
            if isinstance(value, fx.Node) and value is not keep and value not in chain.inner:
                with graph.inserting_before(node):
                    node.update_arg(i, graph.create_node("call_module", name, (value,)))


def _outline(
    graph: fx.Graph,
    add: fx.Node,
    edit: Edit,
    name: str,
    modules: dict[str, nn.Module],
    outlined: list[_Outlined],
) -> _Outlined:
    """The ``outline`` action on one residual add (``retrofit.edit.ACTIONS``): its branch moves
    into a graph of its own and the add becomes a call of the layer ``name``.

    Raises:
        NotOutlinable: the branch cannot be moved (the caller masks it instead).
    """
    assert edit.arg is not None
    subset = bool(getattr(edit.settings, "subset", False))
    region = branch_region(graph, add, edit.arg, modules=modules, subset=subset)
    spec = Outline(region.batched, region.inplace, region.copy_dropped)
    copies: dict[fx.Node, fx.Node] = {}
    extracted = extract_branch(region, copies)
    for inner in outlined:
        # An earlier site inside this branch: its gate now runs in this branch's code.
        inner.call = copies.get(inner.call, inner.call)
    with graph.inserting_before(add):
        branch = graph.create_node("call_function", _constant(None), (), {})
        settings = graph.create_node("call_function", _constant(spec), (), {})
        call = graph.create_node(
            "call_module",
            name,
            (region.shortcut, *region.inputs),
            {"branch": branch, "outline": settings},
        )
    call.meta.update({k: v for k, v in add.meta.items() if k in ("source", "owner_local")})
    add.replace_all_uses_with(call)
    graph.erase_node(add)
    for node in reversed(region.nodes):
        graph.erase_node(node)
    return _Outlined(name, extracted, spec, branch)


# Graph edits that only add a layer's call on a value (replace_call removes the model's own call).
_INSERTIONS = frozenset({"wrap_arg", "insert_after", "outline"})


def _copy(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph()
    new.output(new.graph_copy(graph, {}))
    return new


@dataclass
class Specialised:
    """The owner's edited code for calls matching ``key`` (and ``training``, when not None)."""

    key: CallKey
    training: bool | None
    fn: Callable[..., Any]
    out_spec: Any
    slots: tuple[int, ...]
    masked: dict[str, str]

    def run(self, owner: nn.Module, leaves: list[Any]) -> Any:
        out = self.fn(owner, *[leaves[i] for i in self.slots])
        return tree_unflatten(list(out), self.out_spec)


class RetrofitForward:
    """The forward retrofit installs on an owner: its own code, edited, specialised per call.

    An instance attribute (``owner.forward``), so the class and every other method are the
    owner's own. It holds the owner, its name and the edits (what pickling and ``deepcopy``
    keep); the generated code is rebuilt on the first call of each new kind.
    """

    def __init__(self, owner: nn.Module, name: str, edits: list[tuple[Edit, str]]) -> None:
        self.owner = owner
        self.name = name
        self.edits = edits
        self._reset()

    def as_written_in_eval(self) -> bool:
        """In eval mode the owner's own forward gives what the edited code would: every edit
        inserts a layer that returns its input in eval (module docstring). Not while
        verification runs the edited code (:func:`edited_eval`)."""
        if self.edited_eval:
            return False
        children = self.owner._modules
        return all(
            edit.action in _INSERTIONS and getattr(children.get(attr), "identity_in_eval", False)
            for edit, attr in self.edits
        )

    def _reset(self) -> None:
        self.edited_eval = False
        self.specialised: list[Specialised] = []
        self._pristine: list[tuple[CallKey, Traced]] = []
        self.masked: dict[str, str] = {}  # gate → why its planned outline was masked instead
        self.outlines: dict[str, Outline] = {}  # gate → how its outlined add behaves

    def __getstate__(self) -> dict[str, Any]:
        return {"owner": self.owner, "name": self.name, "edits": self.edits}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def seed(self, traced: Traced) -> None:
        """Offer a training-mode trace the analysis already made (no second trace of it)."""
        if traced.key is not None and not any(k == traced.key for k, _ in self._pristine):
            self._pristine.append((traced.key, traced))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        training = self.owner.training
        if not training and self.as_written_in_eval():
            # The class's forward: the code fx traced (fx traces ``type(root).forward``).
            return type(self.owner).forward(self.owner, *args, **kwargs)
        leaves, spec = tree_flatten((args, kwargs))
        for s in self.specialised:
            if (s.training is None or s.training == training) and s.key.matches(leaves, spec):
                return s.run(self.owner, leaves)
        if any(isinstance(v, fx.Proxy) for v in leaves):
            raise RewriteError(
                f"{self.name or '<root>'}: the rewritten forward is being traced with torch.fx "
                "for a call it has never run; run the model once on a real input first"
            )
        return self._specialise(Call(args, kwargs), training).run(self.owner, leaves)

    def _generate(
        self, traced: Traced, training: bool, modules: dict[str, nn.Module], label: str
    ) -> tuple[Callable[..., Any], _Template | None, dict[str, str]]:
        """The edited forward of ``traced``, and its template for other owners (None when a
        branch's constant cannot be told apart in the generated globals)."""
        graph = _copy(traced.graph)
        outlined, masked = _edit_graph(graph, self.edits, training=training, modules=modules)
        branches = []
        for item in outlined:
            code = _python_code(item.branch)
            item.call.target = self._branch(item.gate, code, item.spec, label)
            branches.append((item, code))
        main = _python_code(graph)
        fn = _function(main.src, main.globals, f"{label} {_mode(training)}")
        names = []
        for item, _ in branches:
            found = [k for k, v in main.globals.items() if v is item.call.target]
            if len(found) != 1:
                return fn, None, masked
            names.append(found[0])
        template = _Template(
            main,
            tuple(
                (item.gate, code, name, item.spec)
                for (item, code), name in zip(branches, names, strict=True)
            ),
            dict(masked),
            tuple(n.target for n in traced.graph.nodes if n.op == "call_function"),
        )
        return fn, template, masked

    def _branch(
        self, gate: str, code: fx.graph.PythonCode, spec: Outline, label: str
    ) -> Callable[[], Any]:
        """The outlined branch of ``gate``, bound to this owner and made the constant the
        generated forward passes the gate: registered nowhere, so state_dict and parameters()
        are unchanged. The gate is told it is outlined."""
        branch = _function(code.src, code.globals, f"{label} branch of {gate}")
        self.owner.get_submodule(gate).outlined = True
        self.outlines[gate] = spec
        return _constant(types.MethodType(branch, self.owner))

    def _serves_eval(self) -> bool:
        """The training edits compute the eval edits' values in eval, bit for bit: the graphs
        differ only in the outlined adds (no ``regroup``: a regrouped sum is summed in another
        order), and an outlined gate at its identity in eval runs its branch and returns
        ``torch.add(shortcut, branch, alpha=1)``, the add as written (``alpha`` 1 is exact)."""
        children = self.owner._modules
        return all(
            e.regroup is None
            and (e.action != "outline" or getattr(children.get(a), "identity_in_eval", False))
            for e, a in self.edits
        )

    def _traced(self, call: Call, training: bool) -> Traced:
        leaves, spec = call.flatten()
        for key, traced in self._pristine:
            if key.matches(leaves, spec) and (not traced.read_training or training):
                return traced
        traced = trace_graph(self.owner, shallow=True, call=call)
        if not traced.read_training and traced.key is not None:
            # Mode-independent: the same trace serves training and eval (edits differ).
            self._pristine.append((traced.key, traced))
        return traced

    def _specialise(self, call: Call, training: bool) -> Specialised:
        label = f"{type(self.owner).__name__}.forward {self.name or '<root>'}"
        try:
            traced = self._traced(call, training)
            # One specialisation for both modes where the training code gives the eval code's
            # values in eval (``_serves_eval``): made once, and the eval check runs it.
            shared = not traced.read_training and self._serves_eval()
            training = training or shared
            modules = dict(self.owner.named_modules())
            key = _template_key(traced, self.edits, training, modules)
            template = _TEMPLATES.get(key) if key is not None else None
            if template is None:
                fn, template, masked = self._generate(traced, training, modules, label)
                if key is not None and template is not None:
                    _TEMPLATES[key] = template
                    if len(_TEMPLATES) > 512:
                        _TEMPLATES.popitem(last=False)
            else:  # the same edits on the same code: only the owner's own branches are new
                _TEMPLATES.move_to_end(key)
                scope = dict(template.code.globals)
                for gate, code, name, spec in template.branches:
                    scope[name] = self._branch(gate, code, spec, label)
                fn = _function(template.code.src, scope, f"{label} {_mode(training)}")
                masked = dict(template.masked)
        except Exception as exc:
            raise RewriteError(
                f"{self.name or '<root>'} ({type(self.owner).__name__}): its forward could not "
                f"be specialised for the call {call.describe()} in "
                f"{'training' if training else 'eval'} mode: {type(exc).__name__}: {exc}"
            ) from exc
        assert traced.key is not None
        for gate, reason in masked.items():
            if gate not in self.masked:
                self.masked[gate] = reason
        mode_dependent = not shared and (
            traced.read_training
            or any(e.action == "outline" or e.regroup is not None for e, _ in self.edits)
        )
        slots = tuple(i for i, is_tensor in enumerate(traced.key.tensors) if is_tensor)
        s = Specialised(
            traced.key,
            training if mode_dependent else None,
            fn,
            traced.out_spec,
            slots,
            masked,
        )
        self.specialised.append(s)
        if len(self.specialised) == 16:
            warnings.warn(
                f"retrofit: {label} has been specialised for 16 different calls (argument "
                "values or shapes its code branches on keep changing); each new kind of call is "
                "traced once",
                RuntimeWarning,
                stacklevel=3,
            )
        return s


@contextmanager
def edited_eval(model: nn.Module) -> Iterator[None]:
    """While the body runs, every rewritten owner runs its edited code in eval too, the
    inserted layers at their identity: what ``verify`` compares with the original. That graph
    is the one the training forward is generated from (cut or traced, then edited), so the
    comparison proves the capture, which running the code as written would not. Where the
    training code serves eval (``RetrofitForward._serves_eval``) it is that code that runs,
    outlined branches and gates' adds included."""
    forwards = [
        f for m in model.modules() if isinstance(f := m.__dict__.get("forward"), RetrofitForward)
    ]
    for f in forwards:
        f.edited_eval = True
    try:
        yield
    finally:
        for f in forwards:
            f.edited_eval = False


def _mode(training: bool) -> str:
    return "train" if training else "eval"


def _install_forward(owner: nn.Module, name: str, edits: list[tuple[Edit, str]]) -> RetrofitForward:
    if is_passthrough(owner):
        raise RewriteError(
            f"{name or '<root>'} is a plain nn.Sequential: it has no forward code of its own to "
            "insert a layer into (wrap the model in a module with a forward)"
        )
    forward = RetrofitForward(owner, name, edits)
    owner.__dict__["forward"] = forward  # instance attribute: the class is untouched
    _state(owner).forward = True
    return forward


def rewrite(
    model: nn.Module,
    plan: Plan,
    *,
    seeds: Callable[[str], Traced | None] | None = None,
) -> Rewrite:
    """Make every edit of ``plan`` on ``model`` (in place); return what was done.

    ``seeds(owner)``: a training-mode trace of ``owner`` the analysis already has, if any, so
    the first specialisation does not trace it again.
    """
    record = Rewrite()
    graph_edits: dict[str, list[Edit]] = {}
    for edit in plan.edits:
        action = ACTIONS.get(edit.action)
        if action is None:
            raise RewriteError(f"unknown edit action {edit.action!r}")
        if action.graph:
            # An outlined branch ending in an existing drop-path module: at rate 0 (undone by
            # strip) the gate is the only stochastic depth; an nn.Identity slot is neutral.
            if (
                edit.action == "outline"
                and edit.target
                and drop_rate_attribute(model.get_submodule(edit.target)) is not None
            ):
                _set_rate(model, edit, 0.0)
            graph_edits.setdefault(edit.module, []).append(edit)
            continue
        _MODULE_EDITS[edit.action](model, edit)
        record.edits[edit.target or ""] = edit
        (record.reused if edit.action == "set_rate" else record.replaced).append(edit.target or "")
    for owner_name, edits in graph_edits.items():
        owner = model.get_submodule(owner_name)
        state = _state(owner)
        named = []
        for edit in edits:
            attr = f"retrofit_{edit.kind}{len(state.added)}"
            owner.add_module(attr, _layer(edit, owner))
            state.added.append(attr)
            named.append((edit, attr))
            qualified = f"{owner_name}.{attr}" if owner_name else attr
            record.inserted.append(qualified)
            record.edits[qualified] = edit
        forward = _install_forward(owner, owner_name, named)
        traced = seeds(owner_name) if seeds is not None else None
        if traced is not None:
            forward.seed(traced)
        record.forwards.append(owner_name)
    model.__dict__[_PLAN] = plan
    return record


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
    if not isinstance(model, nn.Module):
        raise TypeError(f"retrofit.strip expects a torch.nn.Module, got {type(model).__name__}")
    for module in list(model.modules()):
        state: _State | None = module.__dict__.pop(_STATE, None)
        if state is None:
            continue
        unwatch_slot(module)
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
