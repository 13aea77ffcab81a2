"""Tracing any model with torch.fx, with the knowledge timm and torchvision give about their code.

One job: turn an ``nn.Module`` into one or more fx graphs whose nodes know their owning module and
their source line. Analyses (residual sites, stages, dropout→BN paths) read these graphs; nothing
here rewrites a model.

Three things make plain ``torch.fx.symbolic_trace`` fail or mislead on real zoo models:

* timm marks modules and functions it knows are not symbolically traceable
  (``timm.layers.get_notrace_modules`` / ``get_notrace_functions``); they must be leaves/wrapped.
  einops calls and layers, which parse their patterns against real shapes, likewise.
* Regularizers already in the model (Dropout*, timm ``DropPath``/``DropBlock2d``, torchvision
  ``StochasticDepth``/``DropBlock2d``, our own layers) must stay single nodes so analyses can see
  them and rewrites can reuse them.
* Some forwards have data-dependent control flow. Then the module's children are traced instead
  ("hierarchical fallback"), so its blocks still get instrumented, and the skipped forward is
  reported with the reason.

torchvision's ``torch.fx.wrap``-ed functions (``stochastic_depth``, ``shifted_window_attention``…)
are honoured by ``torch.fx.Tracer`` itself once their modules are imported.
"""

from __future__ import annotations

import bisect
import dis
import inspect
import os
import sys
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from retrofit.capture import patching, regions
from retrofit.capture.calls import Call, CallKey, NoCall
from retrofit.capture.concrete import Concretizer, concrete_dunders
from retrofit.capture.detection import PLUMBING_REASON, is_plumbing
from retrofit.capture.existing import is_existing_regularizer, regularizer_types
from retrofit.capture.patching import dispatching, traced_root
from retrofit.capture.regions import Region, Regions, plain_call
from retrofit.capture.sandbox import preserved
from retrofit.capture.structure import graph_key

__all__ = [
    "RetrofitTracer",
    "Skipped",
    "Traced",
    "TraceResult",
    "TracedPart",
    "cut_owner",
    "owner_of",
    "trace",
    "trace_module",
    "uninstalled_call",
]

# Frames from these directories are the tracer's, not the model author's: a node's source line is
# the innermost frame outside them.
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_RETROFIT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _library_notrace() -> tuple[tuple[type, ...], tuple[Any, ...]]:
    """Modules and functions fx must not trace into: timm's no-trace registry, and einops."""
    modules: tuple[type, ...] = ()
    functions: tuple[Any, ...] = ()
    try:
        import timm.models  # noqa: F401  (importing the models registers their no-trace entries)
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # pragma: no cover
        pass
    else:
        modules = tuple(m for m in get_notrace_modules() if isinstance(m, type))
        functions = tuple(f for f in get_notrace_functions() if callable(f))
    einops_modules, einops_functions = _einops_ops()
    return modules + einops_modules, functions + einops_functions


def _einops_ops() -> tuple[tuple[type, ...], tuple[Any, ...]]:
    """einops (``rearrange(x, "b c h w -> b (h w) c")``, its ``Rearrange`` layers) is how much
    hand-written vision code reshapes (vit-pytorch, many papers' reference code). Its functions
    parse the pattern against ``x.shape`` and cache recipes keyed by shapes, which a Proxy cannot
    be: traced into, they fail. Each call is one node instead: a function of its tensors (data
    flows through it, it has no weights), which a specialised trace can also evaluate."""
    if "einops" not in sys.modules:  # only a model that imported it can use it
        return (), ()
    try:
        import einops
        from einops.layers import torch as einops_layers
    except ImportError:  # pragma: no cover - einops without its torch layers
        return (), ()
    names = ("rearrange", "reduce", "repeat", "einsum", "pack", "unpack")
    functions = tuple(getattr(einops, n) for n in names if callable(getattr(einops, n, None)))
    layers = ("Rearrange", "Reduce", "EinMix")
    modules = tuple(t for n in layers if isinstance(t := getattr(einops_layers, n, None), type))
    return modules, functions


class RetrofitTracer(fx.Tracer):
    """An fx tracer that honours timm's no-trace registry and keeps regularizers as leaves.

    With ``shallow=True`` every child of the traced root is a leaf: the graph is exactly the
    root's own ``forward`` body. That is what a rewrite needs (it edits one module's code and
    leaves its children, their classes and hooks, untouched).

    With ``call`` (a :class:`~retrofit.capture.calls.Call` recorded from a real forward), the
    trace is *specialised* on that call instead of freezing arguments at their defaults: its
    tensors become placeholders (any nesting: tuples, dicts, ``*args``/``**kwargs``), other
    values are baked in as given, the output is flattened to its pytree leaves (``out_spec``
    rebuilds it), and Python's questions about proxies (``if x.ndim == 4``, ``h, _ =
    self.attn(x)``, ``math.ceil(H / 7)``) get concrete answers (``capture/concrete.py``), recorded
    as the ``guard`` a later call must satisfy.

    Every node gets ``meta["source"]`` ("file:line" of the model code that created it); fx's own
    ``record_stack_traces`` would do it too, but formats a whole traceback per node and doubles
    tracing time. Tensor and object constants become zero-argument functions in the generated
    code's globals rather than attributes fx would add to the traced module.
    """

    def __init__(
        self,
        *,
        shallow: bool = False,
        extra_leaves: tuple[type, ...] = (),
        call: Call | None = None,
    ):
        notrace_modules, notrace_functions = _library_notrace()
        super().__init__(autowrap_functions=notrace_functions)
        self.shallow = shallow
        self.call = call
        self.concretizer: Concretizer | None = None
        self.out_spec: TreeSpec | None = None
        # A deep symbolic trace records each module call it traces through, so that an owner's
        # own graph can be cut from it (capture/regions.py) instead of traced again.
        self.regions: list[Region] | None = None if shallow or call is not None else Regions()
        self._leaves = notrace_modules + regularizer_types() + tuple(extra_leaves)
        self._root: nn.Module | None = None
        # id -> (tensor, name) of the root's parameters and of its buffers, built on first use
        # in each trace (see getattr and create_arg).
        self._named: dict[str, dict[int, tuple[torch.Tensor, str]]] = {}

    def trace(self, root, concrete_args=None):  # type: ignore[override]
        self._root = root if isinstance(root, nn.Module) else None
        self._named = {}
        # fx's per-trace cache of get_attr proxies, for the session's dispatchers (patching.py)
        self.parameter_proxies: dict[str, fx.Proxy] = {}
        if self._root is not None:
            # fx wraps only functions it was told of; a TorchScript function is called with a
            # Proxy otherwise, which it rejects (a compiled activation in a block's forward).
            self._autowrap_function_ids.update(id(f) for f in _script_functions(self._root))
        with dispatching(self):
            if self.call is None:
                return super().trace(root, concrete_args)
            self.concretizer = Concretizer(root)
            with concrete_dunders():
                return super().trace(root, None)

    @property
    def guard(self) -> str:
        return self.concretizer.guard if self.concretizer is not None else "none"

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.shallow and m is not self._root:
            # Children are leaves, except pass-through containers, whose chaining is inlined
            # so the owner's graph reaches the modules they hold (is_passthrough).
            return not is_passthrough(m)
        if isinstance(m, self._leaves) or is_existing_regularizer(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):  # type: ignore[override]
        if self.submodule_paths and m not in self.submodule_paths:
            if is_passthrough(m):
                # A Sequential made on the fly (``self.features[1:4](x)``, DPN encoders): its
                # members are the model's own, each recorded under its name.
                return forward(*args, **kwargs)
            # A module held outside the module tree (``self.proj = [conv]``, a dict attribute)
            # has no name fx can record a call_module by: it is one opaque call instead, whose
            # learned maps the analyses still weigh (``uninstalled_module``).
            return self.create_proxy("call_function", uninstalled_call(m), args, kwargs)
        if self.regions is not None and not is_passthrough(m):
            forward = self._recorded(m, forward, args, kwargs)
        return super().call_module(m, forward, args, kwargs)

    def _recorded(self, m: nn.Module, forward: Callable[..., Any], args, kwargs):
        """``forward``, recording the call as a Region when fx traces through it (a leaf's
        forward is never called: its call is one node)."""
        name = self.submodule_paths.get(m, "")
        stack = dict(self.module_stack)
        source = _user_source()
        plain = plain_call(m)

        def traced_through(*a: Any, **k: Any) -> Any:
            start = self.graph._root.prev  # the graph's last node (the root sentinel if none)
            with _watch_training(m) as reads:
                out = forward(*a, **k)
            self.regions.append(  # type: ignore[union-attr]
                Region(
                    name,
                    m,
                    args,
                    kwargs,
                    out,
                    start,
                    self.graph._root.prev,
                    stack,
                    source,
                    bool(reads),
                    m.training,
                    plain,
                )
            )
            return out

        return traced_through

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):  # type: ignore[override]
        if isinstance(target, torch.jit.ScriptFunction):
            target = _script_call(target)  # a Python function: graphs get deep-copied
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        node.meta["source"] = _user_source()
        if self.concretizer is not None:
            self.concretizer.created(node)
        return node

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:  # type: ignore[override]
        # fx finds a parameter's name by scanning root.named_parameters() at every read of a
        # parameter attribute: quadratic in the model's size (a fifth of a ViT block's trace).
        # The same answer — the parameter's first name in that order, one get_attr node per
        # name — comes from a map built once per trace; fx's own lookup remains for what the
        # map does not hold (a parameter the forward registered after the map was built).
        if isinstance(attr_val, nn.Parameter) and not self.param_shapes_constant:
            name = self._name_of(attr_val, "parameters")
            if name is not None:
                proxy = parameter_proxy_cache.get(name)
                if proxy is None:
                    proxy = parameter_proxy_cache[name] = self.create_proxy(
                        "get_attr", name, (), {}
                    )
                return proxy
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def _name_of(self, tensor: torch.Tensor, kind: str) -> str | None:
        """The first name of ``tensor`` among the root's parameters or buffers (``kind``),
        as ``named_parameters()``/``named_buffers()`` list them, if it is still there."""
        table = self._named.get(kind)
        if table is None:
            named = (
                self.root.named_parameters() if kind == "parameters" else self.root.named_buffers()
            )
            table = self._named[kind] = {}
            for name, t in named:
                table.setdefault(id(t), (t, name))
        entry = table.get(id(tensor))
        if entry is None or entry[0] is not tensor:
            return None
        name = entry[1]
        # Still registered under that name (the forward may have moved it since the map was
        # built): a walk through the module dicts, no attribute access (fx patched __getattr__).
        *path, leaf = name.split(".")
        module = self.root
        for atom in path:
            module = module._modules.get(atom)
            if module is None:
                return None
        store = module._parameters if kind == "parameters" else module._buffers
        return name if store.get(leaf) is tensor else None

    def _is_buffer(self, tensor: torch.Tensor) -> bool:
        if self.root is None:
            return False
        if self._name_of(tensor, "buffers") is not None:
            return True
        return any(tensor is b for b in self.root.buffers())

    def create_arg(self, a: Any) -> Any:  # type: ignore[override]
        if isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter):
            known = self.tensor_attrs.get(a) if hasattr(self, "tensor_attrs") else None
            if known is None and not self._is_buffer(a):
                return self.create_node("call_function", _constant(a), (), {})
        try:
            return super().create_arg(a)
        except NotImplementedError:
            if self.call is None:
                raise
            # An object passed to a child as is (a config, a cache): baked in, like any
            # non-tensor argument of the specialised call.
            return self.create_node("call_function", _constant(a), (), {})

    # ------------------------------------------------------------- specialised traces

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):  # type: ignore[override]
        if self.call is None:
            fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)
            return traced_root(fn), args
        assert self.concretizer is not None
        leaves, spec = self.call.flatten()
        names = _leaf_names(root_fn, self.call, len(leaves))
        slots: list[int] = []
        placeholders = []
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor):
                proxy = self.create_proxy("placeholder", names[i], (), {})
                self.concretizer.bind(proxy.node, leaf)
                slots.append(i)
                placeholders.append(proxy)

        def specialised(module: nn.Module, *proxies: Any) -> tuple[Any, ...]:
            values = list(leaves)
            for i, proxy in zip(slots, proxies, strict=True):
                values[i] = proxy
            args, kwargs = tree_unflatten(values, spec)
            out_leaves, self.out_spec = tree_flatten(root_fn(module, *args, **kwargs))
            for leaf in out_leaves:
                if not isinstance(leaf, _OUTPUT_LEAVES):
                    raise fx.proxy.TraceError(
                        f"the forward returns a {type(leaf).__name__}, which cannot be rebuilt "
                        "from a traced graph"
                    )
            return tuple(out_leaves)

        return traced_root(specialised), [self.root, *placeholders]

    def to_bool(self, obj: fx.Proxy) -> bool:
        if self.concretizer is None:
            return super().to_bool(obj)
        return bool(self.concretizer.require(obj, "bool"))

    def iter(self, obj: fx.Proxy) -> Iterator[Any]:
        if self.concretizer is None:
            return super().iter(obj)
        value = self.concretizer.require(obj, "iter")
        if isinstance(value, dict):
            return iter(list(value))
        return iter([obj[i] for i in range(len(value))])

    def keys(self, obj: fx.Proxy) -> Any:
        if self.concretizer is None:
            return super().keys(obj)
        return list(self.concretizer.require(obj, "keys").keys())


_CALL_MODULE_CODE = RetrofitTracer.call_module.__code__
_PATCHING_FILE = patching.__file__

# Per code object: the offsets of its instructions, in order, and the element count of each
# that unpacks a sequence (None for any other instruction).
_UNPACKS: weakref.WeakKeyDictionary[Any, tuple[list[int], list[int | None]]] = (
    weakref.WeakKeyDictionary()
)


def _unpack_count(code: Any, lasti: int) -> int | None:
    """How many values the instruction at ``lasti`` of ``code`` unpacks (None: it is not an
    ``UNPACK_SEQUENCE``): the question fx's ``Proxy.__iter__`` asks, answered from a table made
    once per code object instead of a disassembly of the whole function at every unpack."""
    table = _UNPACKS.get(code)
    if table is None:
        instructions = list(dis.get_instructions(code))
        offsets = [i.offset for i in instructions]
        counts = [i.argval if i.opname == "UNPACK_SEQUENCE" else None for i in instructions]
        table = _UNPACKS[code] = (offsets, counts)
    offsets, counts = table
    # As fx locates the instruction: the first at or after ``f_lasti`` (3.11 and later, where
    # offsets include inline caches), else by index (two bytes an instruction).
    index = bisect.bisect_left(offsets, lasti) if sys.version_info >= (3, 11) else lasti // 2
    return counts[index]


class _Unpacking:
    """fx's ``Proxy.__iter__`` and attribute proxies, with the unpack question cached.

    ``q, k, v = qkv.unbind(0)`` (timm's Attention) iterates a Proxy; fx then disassembles the
    calling function to learn whether this is a tuple unpack, and of how many values, at every
    such line of every block: a tenth of a ViT's trace. The answer is the same per instruction,
    so it is computed once (:func:`_unpack_count`); everything else is fx's own behaviour, and
    an iteration that is not an unpack still asks the tracer (``RetrofitTracer.iter``).
    """

    def __iter__(self) -> Iterator[Any]:
        frame = sys._getframe(1)
        count = _unpack_count(frame.f_code, frame.f_lasti)
        del frame
        if count is not None:
            return (self[i] for i in range(count))  # type: ignore[index]
        return self.tracer.iter(self)  # type: ignore[attr-defined]

    def __getattr__(self, k: str) -> fx.proxy.Attribute:
        # fx's Attribute, with this class's __iter__ (``B, N, C = x.shape``)
        return _Attribute(self, k)  # type: ignore[arg-type]


class _Proxy(_Unpacking, fx.Proxy):
    pass


class _Attribute(_Unpacking, fx.proxy.Attribute):
    pass


# What a specialised forward may return at its leaves: values the graph computes or constants.
_OUTPUT_LEAVES = (fx.Proxy, torch.Tensor, *regions.OUTPUT_CONSTANTS)


def _script_functions(root: nn.Module) -> list[Any]:
    """The TorchScript functions (``torch.jit.script`` of a function) in the globals of the
    forwards of ``root`` and its submodules: the calls fx must record as leaves."""
    found: dict[int, Any] = {}
    seen: set[int] = set()
    for module in root.modules():
        forward = inspect.unwrap(type(module).forward)
        scope = getattr(forward, "__globals__", None)
        if scope is None or id(scope) in seen:
            continue
        seen.add(id(scope))
        for value in scope.values():
            if isinstance(value, torch.jit.ScriptFunction):
                found[id(value)] = value
    return list(found.values())


_SCRIPT_CALLS: dict[int, tuple[Any, Callable[..., Any]]] = {}


def _script_call(fn: Any) -> Callable[..., Any]:
    """A plain function calling the TorchScript function ``fn`` (one per ``fn``, so re-traces
    agree): copying a graph copies its targets, and a ScriptFunction cannot be copied."""
    known = _SCRIPT_CALLS.get(id(fn))
    if known is not None and known[0] is fn:
        return known[1]

    def scripted(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    scripted.__name__ = scripted.__qualname__ = str(getattr(fn, "name", "scripted"))
    _SCRIPT_CALLS[id(fn)] = (fn, scripted)
    return scripted


def uninstalled_call(module: nn.Module) -> Callable[..., Any]:
    """A function calling ``module`` (one not installed as a submodule), which the graph records
    as a call_function; ``uninstalled_module`` on it is the module, for the analyses."""

    def uninstalled_module(*args: Any, **kwargs: Any) -> Any:
        return module(*args, **kwargs)

    uninstalled_module.uninstalled_module = module  # type: ignore[attr-defined]
    return uninstalled_module


def _constant(value: Any) -> Any:
    """A zero-argument function returning ``value``: how a constant enters generated code."""

    def retrofit_constant() -> Any:
        return value

    return retrofit_constant


def _leaf_names(fn: Any, call: Call, count: int) -> list[str]:
    """Placeholder names for the call's pytree leaves (positional arguments first, then keyword
    arguments in call order, as the pytree flattens them): the parameter a leaf was passed as
    (``x``, ``pixel_values``), with an index appended for nested leaves."""
    try:
        params = list(inspect.signature(fn).parameters.values())[1:]
    except (TypeError, ValueError):
        params = []
    positional = [
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    labelled = [
        (positional[i] if i < len(positional) else f"arg{i}", value)
        for i, value in enumerate(call.args)
    ] + list(call.kwargs.items())
    names: list[str] = []
    for label, value in labelled:
        sub = tree_flatten(value)[0]
        names += [label] if len(sub) == 1 else [f"{label}_{k}" for k in range(len(sub))]
    return names if len(names) == count else [f"arg{i}" for i in range(count)]


def _user_source() -> str | None:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code is _CALL_MODULE_CODE or frame.f_code.co_filename == _PATCHING_FILE:
            # The tracer's own hook, or the session's dispatcher: between model frames.
            frame = frame.f_back
            continue
        filename = frame.f_code.co_filename
        if filename.startswith(_RETROFIT_DIR):
            # Reached the tracer's caller: the op was made by torch's own code (a root that is
            # a plain nn.Sequential), which has no model source line of its own.
            return None
        if not filename.startswith(_TORCH_DIR) and not filename.startswith("<"):
            return f"{filename}:{frame.f_lineno}"
        frame = frame.f_back
    return None


def is_passthrough(module: nn.Module | type) -> bool:
    """A container whose forward only chains its children (``nn.Sequential`` and subclasses
    that keep its forward). It owns no code of its own: its ops belong to whoever calls it,
    and a rewrite must never add children to it (``len`` and indexing would change)."""
    cls = module if isinstance(module, type) else type(module)
    return getattr(cls, "forward", None) is nn.Sequential.forward


def default_args(module: nn.Module) -> dict[str, Any]:
    """Forward parameters with a plain default (None, a bool, a number, a string), traced as that constant.

    fx makes every parameter a proxy, so ``if mask is not None`` or ``if is_causal`` would fail
    or trace a branch callers never take. Tracing the defaults gives the graph callers actually
    run; a rewritten forward falls back to the original code when a caller passes another value.
    """
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {
        name: p.default
        for name, p in sig.parameters.items()
        if p.kind in kinds
        and p.default is not inspect.Parameter.empty
        and (p.default is None or isinstance(p.default, bool | int | float | str))
    }


try:
    # Generates the graph's Python only when it is first run: the analyses read graphs, they do
    # not run them (a tenth of a ResNet-50 trace is code generation).
    from torch.fx._lazy_graph_module import _LazyGraphModule as _GraphModule
except ImportError:  # pragma: no cover - a torch without it
    _GraphModule = fx.GraphModule

# How many traces this process made, by kind: what the "one trace per owner" rule is held to.
TRACES: Counter[str] = Counter()


@dataclass
class Traced:
    """One traced forward and what its graph assumed.

    ``read_training``: the module's own code read ``self.training`` (fx bakes the read in, so
    the graph holds for that mode only). ``call``/``key``: the call it was specialised on and
    what a later call must match (None for a symbolic trace with arguments at their defaults).
    ``out_spec``: rebuilds the forward's output from the graph's flat output (specialised traces).
    ``regions``: the module calls a deep symbolic trace traced through, from which an owner's
    own graph is cut (``capture/regions.py``).
    """

    graph: fx.Graph
    read_training: bool
    call: Call | None = None
    key: CallKey | None = None
    out_spec: TreeSpec | None = None
    regions: list[Region] = field(default_factory=Regions)
    _structure: Any = field(default=None, init=False, repr=False, compare=False)

    def structure(self) -> tuple[Any, ...] | None:
        """``graph_key(graph, meta=True)`` (``capture/structure.py``), computed once: a traced
        graph is never edited (the rewrite and the outline check edit copies), and both ask it
        of every owner."""
        if self._structure is None:
            self._structure = (graph_key(self.graph, meta=True),)
        return self._structure[0]


def trace_graph(module: nn.Module, *, shallow: bool = False, call: Call | None = None) -> Traced:
    """Trace one module to a bare graph (no GraphModule, no code generation).

    Without ``call`` the forward's parameters with plain defaults are traced as those defaults
    (:func:`default_args`); with it, the trace is specialised on that call (RetrofitTracer).
    Nothing the forward writes to the model while being traced survives (capture/sandbox.py).
    """
    TRACES["shallow" if shallow else "deep"] += 1
    tracer = RetrofitTracer(shallow=shallow, call=call)
    with preserved(module), _watch_training(module) as reads:
        concrete = None if call is not None else (default_args(module) or None)
        graph = tracer.trace(module, concrete_args=concrete)
    for node in graph.nodes:
        node.meta["owner_local"] = owner_of(node)
    key = None
    if call is not None:
        leaves, spec = call.flatten()
        key = CallKey.of(leaves, spec, tracer.guard)
    return Traced(graph, bool(reads), call, key, tracer.out_spec, tracer.regions or Regions())


def trace_module(
    module: nn.Module, *, shallow: bool = False, call: Call | None = None
) -> fx.GraphModule:
    """Trace one module (raises whatever fx raises when it cannot)."""
    traced = trace_graph(module, shallow=shallow, call=call)
    gm = _GraphModule(module, traced.graph, module.__class__.__name__)
    gm.meta["retrofit_call"] = call
    gm.meta["retrofit_regions"] = traced.regions
    return gm


def cut_owner(part: TracedPart, owner: str) -> Traced | None:
    """``owner``'s shallow training-mode graph cut from ``part``'s trace (``capture/regions.py``),
    or None where it cannot be cut exactly. ``owner`` is qualified in the model."""
    gm = part.graph_module
    if gm.meta.get("retrofit_call") is not None:
        return None  # specialised: its answers hold for its own call only
    if part.prefix and not owner.startswith(part.prefix + "."):
        return None
    local = owner[len(part.prefix) + 1 :] if part.prefix else owner
    cut_ = regions.cut(gm.graph, gm.meta.get("retrofit_regions") or [], local, _leaf_names)
    if cut_ is None:
        return None
    graph, read_training, key, out_spec = cut_
    for node in graph.nodes:
        node.meta["owner_local"] = owner_of(node)
    TRACES["cut"] += 1
    return Traced(graph, read_training, None, key, out_spec)


_WATCHED: dict[type, type] = {}


@contextmanager
def _watch_training(module: nn.Module) -> Iterator[list[bool]]:
    """Record reads of ``module.training`` (its own flag, not its children's).

    The module's class is swapped, for the duration, for a subclass whose ``training`` is a
    property: a data descriptor wins over the instance ``__dict__``, so every read is seen.
    """
    reads: list[bool] = []
    cls = type(module)
    if "training" in vars(cls) or not hasattr(module, "__dict__"):
        reads.append(True)  # cannot watch: assume it is read
        yield reads
        return
    watched = _WATCHED.get(cls)
    if watched is None:

        def get(self: nn.Module) -> bool:
            self.__dict__.get("_retrofit_reads", []).append(True)
            return self.__dict__["training"]

        def set_(self: nn.Module, value: bool) -> None:
            self.__dict__["training"] = value

        watched = type(
            cls.__name__, (cls,), {"training": property(get, set_), "__module__": cls.__module__}
        )
        _WATCHED[cls] = watched
    module.__dict__["_retrofit_reads"] = reads
    try:
        module.__class__ = watched
    except (TypeError, AttributeError, RuntimeError):  # a class that refuses the swap
        del module.__dict__["_retrofit_reads"]
        reads.append(True)
        yield reads
        return
    try:
        yield reads
    finally:
        module.__class__ = cls
        del module.__dict__["_retrofit_reads"]


@dataclass
class TracedPart:
    """A traced module: ``prefix`` is its qualified name in the model ("" for the root)."""

    prefix: str
    module: nn.Module
    graph_module: fx.GraphModule

    def nodes(self) -> Iterator[fx.Node]:
        return iter(self.graph_module.graph.nodes)


@dataclass
class Skipped:
    """A module whose own forward could not be traced; its children were traced instead."""

    module: str
    reason: str
    # Why skipping it loses nothing, when that is known (a library's bookkeeping forward with
    # no residual or conv stage of its own); None: its own code is unread.
    known: str | None = None

    def to_dict(self) -> dict[str, str]:
        out = {"module": self.module, "reason": self.reason}
        if self.known:
            out["known"] = self.known
        return out


@dataclass
class TraceResult:
    parts: list[TracedPart] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.skipped


def owner_of(node: fx.Node, prefix: str = "") -> str:
    """Qualified name of the module whose forward code created ``node``.

    For a ``call_module`` node that is the caller, not the called module: the innermost entry of
    ``nn_module_stack`` other than the call target itself. Pass-through containers
    (``nn.Sequential``) are skipped: a call of ``features.5`` belongs to the model that runs
    ``self.features(x)``.
    """
    stack = node.meta.get("nn_module_stack") or {}
    entries = list(stack.values())
    if node.op == "call_module" and entries and entries[-1][0] == node.target:
        entries = entries[:-1]
    names = [qual for qual, cls in entries if not (isinstance(cls, type) and is_passthrough(cls))]
    return _join(prefix, names[-1]) if names else prefix


def _join(prefix: str, name: str) -> str:
    if not name:
        return prefix
    return f"{prefix}.{name}" if prefix else name


def _annotate(part: TracedPart) -> None:
    for node in part.graph_module.graph.nodes:
        node.meta["owner"] = _join(part.prefix, node.meta["owner_local"])


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first[:200]}"


def trace(model: nn.Module, calls: Callable[[str], Call | None] | None = None) -> TraceResult:
    """Trace ``model``; where a forward cannot be traced, trace its children instead.

    ``calls(name)`` gives the recorded call of a module (``capture/calls.py``), or None. The root
    is traced symbolically first (its probe call is the user's ``model(x)``), then specialised
    on its recorded call; any other part is specialised on its own call first, as its caller
    really makes it (``block(x, drop_connect_rate=0.2)``), and traced with defaults only when
    it has no recorded call.

    Every node of every part carries ``meta["owner"]`` (qualified module name in ``model``) and
    ``meta["source"]`` ("file:line").
    """
    result = TraceResult()
    leaf = RetrofitTracer()

    def attempt(module: nn.Module, prefix: str) -> fx.GraphModule | str:
        reasons: list[str] = []

        def one(call: Call | None) -> fx.GraphModule | None:
            try:
                return trace_module(module, call=call)
            except Exception as exc:  # fx raises many types (TraceError, TypeError…)
                reasons.append(_short(exc))
                return None

        # The root symbolically first: no forward is needed when that reads it.
        gm = one(None) if not prefix else None
        if gm is None:
            try:
                call = calls(prefix) if calls is not None else None
            except NoCall as exc:
                call = None
                reasons.append(str(exc))
            if call is not None:
                gm = one(call)
            if gm is None and prefix:
                gm = one(None)
        return gm if gm is not None else "; ".join(dict.fromkeys(reasons))

    def visit(module: nn.Module, prefix: str) -> None:
        if isinstance(module, nn.ModuleList | nn.ModuleDict):
            # No forward of their own: the blocks they hold are what the fallback is after.
            for name, child in module.named_children():
                visit(child, _join(prefix, name))
            return
        gm = attempt(module, prefix)
        if isinstance(gm, str):
            children = [
                (name, child)
                for name, child in module.named_children()
                if isinstance(child, nn.ModuleList | nn.ModuleDict)
                or not leaf.is_leaf_module(child, _join(prefix, name))
            ]
            what = "traced its children instead" if children else "nothing below it to trace"
            # A library forward known to hold no site of its own (capture/detection.py) is still
            # listed, with that knowledge: it does not make the read partial.
            known = PLUMBING_REASON if is_plumbing(module) else None
            result.skipped.append(Skipped(prefix or "<root>", f"{gm}; {what}", known))
            for name, child in children:
                visit(child, _join(prefix, name))
            return
        part = TracedPart(prefix, module, gm)
        _annotate(part)
        result.parts.append(part)
        # timm marks some blocks no-trace (NFNet's NormFreeBlock) because of code elsewhere in
        # its feature extraction; alone they often trace. They are leaves here, so their own
        # residuals are only seen if each is traced as a part of its own.
        for node in gm.graph.nodes:
            name = _join(prefix, str(node.target)) if node.op == "call_module" else ""
            if not name or name in expanded:
                continue
            child = gm.get_submodule(str(node.target))
            if isinstance(child, notrace) and next(child.children(), None) is not None:
                expanded.add(name)
                visit(child, name)

    notrace = _library_notrace()[0]
    expanded: set[str] = set()
    visit(model, "")
    return result
