"""Concrete values behind a trace: what lets fx read code that branches on shapes.

A symbolic trace fails where Python needs a real value: ``if x.ndim == 4``, ``h, _ =
self.attn(x)`` (how many values?), ``math.ceil(H / 7)`` (``float()`` of a Proxy), ``min(H, W)``,
``for i in range(x.shape[1])``. When the tracer specialises a module on a real call
(``capture/calls.py``), every proxy stands for a value that can be computed: the call's tensors
fill the placeholders and the graph recorded so far is run up to the node Python asks about
(lazily: code that never asks costs nothing). Python then gets a real bool, int, float or
length, and the graph is *specialised* — the branch not taken is not in it.

A specialisation is only sound if it is re-checked on later calls. What a concrete value was
computed from decides what the graph depends on (:data:`retrofit.capture.calls.GUARDS`):

* a tuple's or list's length (a module returning two values), a dict's keys: the code's
  structure, nothing to check;
* a tensor's rank (``B, L, C = x.shape`` unpacks ``len(x.shape)`` values): the call's tensors
  must have the same ranks;
* a tensor's dtype or device (``torch.finfo(q.dtype).max``): the same ranks, dtypes and
  devices;
* anything else computed from shapes, dtypes or devices only: the call's tensors must have the
  same shapes, dtypes and devices;
* anything computed from tensor *data* (``if x.max() > 0``, ``if torch.rand(1) < p``): refused.
  Baking it in would silently fix one outcome of a data-dependent or random decision, so the
  module is not specialised at all (:class:`DataDependent`; the caller falls back to its
  children or refuses the model).

Values are computed outside the trace (fx's patches reverted), under ``no_grad``, with every
called child in eval mode: only shapes and structure matter, and a BatchNorm must not update its
running statistics while the model is being read.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.fx._symbolic_trace import _is_fx_tracing_context, _maybe_revert_all_patches
from torch.utils._pytree import tree_flatten

from retrofit.capture.calls import GUARDS
from retrofit.capture.sandbox import mode

__all__ = ["Concretizer", "DataDependent", "concrete_dunders", "is_metadata"]

# Reading a tensor's metadata does not make the result depend on the tensor's values: a mask
# built from ``x.shape`` is a constant for analysis purposes, not a data path from the input.
_METADATA_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "layout"}
_METADATA_METHODS = {"size", "dim", "numel", "type", "get_device", "nelement"}


def is_metadata(node: fx.Node) -> bool:
    """Whether ``node`` only reads a tensor's metadata (shape, rank, dtype, device)."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in _METADATA_ATTRS
    return node.op == "call_method" and node.target in _METADATA_METHODS


class DataDependent(fx.proxy.TraceError):
    """The code branches on tensor data: no specialisation would stay correct."""


def _rank_read(node: fx.Node) -> bool:
    if node.op == "call_function":  # getattr(x, "ndim")
        return len(node.args) > 1 and node.args[1] == "ndim"
    return node.op == "call_method" and node.target == "dim"


def _dtype_read(node: fx.Node) -> bool:
    return node.op == "call_function" and len(node.args) > 1 and node.args[1] in _DTYPE_ATTRS


_DTYPE_ATTRS = ("dtype", "device", "is_cuda", "layout")


class Concretizer:
    """Concrete values of the nodes of one trace, computed on demand, and the guard they imply."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.values: dict[fx.Node, Any] = {}
        self.position: dict[fx.Node, int] = {}
        self.dependence: dict[fx.Node, str] = {}
        self.guard = "none"

    # ----------------------------------------------------------------- recording

    def created(self, node: fx.Node) -> None:
        self.position[node] = len(self.position)

    def bind(self, node: fx.Node, value: Any) -> None:
        self.values[node] = value

    # ----------------------------------------------------------------- queries from Python

    def require(self, proxy: fx.Proxy, what: str) -> Any:
        """The value of ``proxy`` for ``what`` Python needs (``bool``, ``int``, ``float``,
        ``index``, ``len``, ``iter``, ``keys``); raises :class:`DataDependent` when it depends on
        tensor data."""
        node = proxy.node
        value = self.value(node)
        if what in ("len", "iter", "keys"):
            if isinstance(value, torch.Size):
                self._widen("rank")
            elif isinstance(value, Tensor):
                self._widen("shape")  # len(x) is x.shape[0]
            elif not isinstance(value, tuple | list | dict):
                self._widen(self._checked(node, what))
            return value
        self._widen(self._checked(node, what))
        return value

    def _checked(self, node: fx.Node, what: str) -> str:
        dep = self.depends(node)
        if dep == "data":
            where = node.meta.get("source") or "unknown source"
            raise DataDependent(
                f"control flow on tensor data ({what} of {node.name}, at {where}): a specialised "
                "graph would bake in one outcome"
            )
        return "none" if dep == "const" else dep

    def _widen(self, guard: str) -> None:
        if GUARDS.index(guard) > GUARDS.index(self.guard):
            self.guard = guard

    # ----------------------------------------------------------------- what a value depends on

    def depends(self, node: fx.Node) -> str:
        """``"const"``, ``"rank"``, ``"shape"`` or ``"data"`` (see the module docstring).

        Reading a tensor's metadata cuts data dependence (as in ``analysis/dataflow.py``); a
        function of metadata and constants depends on the widest of its inputs; a module call,
        a placeholder, a parameter or an op with no traced inputs (``torch.rand(1)``) is data.
        """
        memo = self.dependence
        stack = [node]
        while stack:
            n = stack[-1]
            if n in memo:
                stack.pop()
                continue
            if is_metadata(n):
                memo[n] = "rank" if _rank_read(n) else "dtype" if _dtype_read(n) else "shape"
                stack.pop()
                continue
            inputs = n.all_input_nodes
            pending = [a for a in inputs if a not in memo]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            if n.op in ("call_function", "call_method") and inputs:
                deps = [memo[a] for a in inputs]
                memo[n] = (
                    "data"
                    if "data" in deps
                    else max(deps, key=lambda d: ("const", *GUARDS[1:]).index(d))
                )
            else:
                memo[n] = "data"
        return memo[node]

    # ----------------------------------------------------------------- evaluation

    def value(self, node: fx.Node) -> Any:
        if node in self.values:
            return self.values[node]
        missing: set[fx.Node] = set()
        stack = [node]
        while stack:
            n = stack.pop()
            if n in self.values or n in missing:
                continue
            missing.add(n)
            stack.extend(n.all_input_nodes)
        order = sorted(missing, key=self.position.__getitem__)
        with _maybe_revert_all_patches(), _is_fx_tracing_context(False), torch.no_grad():
            for n in order:
                self.values[n] = self._run(n)
        return self.values[node]

    def _run(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            raise fx.proxy.TraceError(f"placeholder {node.name} has no concrete value")
        args = fx.node.map_arg(node.args, self.values.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, self.values.__getitem__)
        if node.op == "get_attr":
            value: Any = self.root
            for atom in str(node.target).split("."):
                value = getattr(value, atom)
            return value
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            receiver, *rest = args
            return getattr(receiver, str(node.target))(*rest, **kwargs)
        if node.op == "call_module":
            module = self.root.get_submodule(str(node.target))
            with mode(module, False):
                return module(*args, **kwargs)
        raise fx.proxy.TraceError(f"cannot evaluate node {node.name} ({node.op})")


# Python asks a Proxy for a length or a number through dunders fx does not route to its tracer
# (``__len__`` raises, ``__index__``/``__int__``/``__float__`` do not exist). While a retrofit
# tracer with concrete values runs, they ask it; any other tracer keeps fx's behaviour.
_ORIGINAL_LEN = fx.Proxy.__len__


def _asker(what: str, convert: Any) -> Any:
    def dunder(self: fx.Proxy) -> Any:
        concretizer = getattr(self.tracer, "concretizer", None)
        if concretizer is None:
            if what == "len":
                return _ORIGINAL_LEN(self)
            raise TypeError(f"{what}() of a torch.fx Proxy needs a concrete value")
        return convert(concretizer.require(self, what))

    return dunder


_DUNDERS = {
    "__len__": _asker("len", len),
    "__index__": _asker("index", int),
    "__int__": _asker("int", int),
    "__float__": _asker("float", float),
}


def _proxies(value: Any) -> list[fx.Proxy]:
    leaves, _ = tree_flatten(value)
    return [v for v in leaves if isinstance(v, fx.Proxy)]


def _info(original: Any) -> Any:
    """``torch.finfo``/``torch.iinfo`` of a traced dtype: they are types, not functions fx can
    record, so Python needs the dtype itself (the concrete tensor's, guarded as ``dtype``)."""

    def info(type: Any = None) -> Any:  # noqa: A002 - torch's own parameter name
        if isinstance(type, fx.Proxy):
            concretizer = getattr(type.tracer, "concretizer", None)
            if concretizer is None:
                raise TypeError(f"torch.{original.__name__}() of a traced dtype needs its value")
            type = concretizer.require(type, "dtype")
        return original() if type is None else original(type)

    return info


def _recorded(original: Any) -> Any:
    """``torch.as_tensor([h, w])`` on traced values: recorded as one node (fx only records a
    torch function whose tensor arguments are proxies, not proxies inside a list)."""

    def fn(*args: Any, **kwargs: Any) -> Any:
        proxies = _proxies((args, kwargs))
        if not proxies:
            return original(*args, **kwargs)
        return proxies[0].tracer.create_proxy("call_function", original, args, kwargs)

    fn.__name__ = original.__name__
    return fn


_TORCH_PATCHES = {
    "finfo": _info,
    "iinfo": _info,
    "as_tensor": _recorded,
    "tensor": _recorded,
}


@contextmanager
def concrete_dunders() -> Iterator[None]:
    """While a specialised trace runs: Python's questions to a Proxy (``len``, ``int``,
    ``float``, ``index``) and the torch calls that take traced values inside Python objects
    (:data:`_TORCH_PATCHES`) are answered from the concrete values."""
    saved = {name: fx.Proxy.__dict__.get(name) for name in _DUNDERS}
    for name, fn in _DUNDERS.items():
        setattr(fx.Proxy, name, fn)
    originals = {name: getattr(torch, name) for name in _TORCH_PATCHES}
    for name, wrap in _TORCH_PATCHES.items():
        setattr(torch, name, wrap(originals[name]))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch, name, original)
        for name, fn in saved.items():
            if fn is None:
                delattr(fx.Proxy, name)
            else:
                setattr(fx.Proxy, name, fn)
