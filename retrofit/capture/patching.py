"""One patching of ``nn.Module`` for all the traces of an ``apply`` or a ``plan``.

An fx trace reroutes module calls and attribute reads to its tracer by assigning
``nn.Module.__call__`` and ``nn.Module.__getattr__`` on entry and putting them back on exit.
Assigning a dunder of a class makes CPython update that slot in every subclass: with timm and
torchvision imported there are some 1,400 ``nn.Module`` subclasses, and the four assignments
cost 2 to 3 ms per trace — 25 to 30 ms of an ``apply`` that traces a model and each of its
block owners (13 to 17 traces on a ResNet-50 or a ViT), more than the whole-model trace itself.

:func:`trace_session` makes the assignments once for its body: it installs dispatchers that
hand a call or an attribute read to the retrofit tracer running in this thread, as fx's own
wrappers would (``RetrofitTracer.call_module``/``getattr``, with fx's autowrap check of the
callee's globals), and otherwise to the methods they replaced. fx's tracer skips its own
patching when it finds a method already patched (the ``__fx_already_patched`` mark its
``_Patcher`` reads), so a retrofit trace inside a session marks the dispatchers for the moment
fx patches (:func:`dispatching`) and unmarks them as the traced forward starts: any other fx
trace — before, after or inside it — patches and restores as usual, over the dispatchers.

Even once, the two assignments and their undoing walk all those subclasses: some 2 ms of an
``apply`` of a small model. Given the model, a session patches less (:func:`_model_classes`):
module calls are routed at ``nn.Module._call_impl``, which ``nn.Module.__call__`` looks up as a
plain attribute (no slot to update), and ``__getattr__`` is assigned on the model's own module
classes only (a few, with few subclasses). fx is kept from patching by marking the methods it
finds on ``nn.Module`` (its own originals then) for the moment it would patch, as above. Where
the model's classes do not allow it (a class with a ``__getattr__`` or ``_call_impl`` of its
own, a compiled module), the session patches ``nn.Module`` as above.

Outside a session (``retrofit.stages``, the lint, a trace of one module) nothing changes: fx
patches per trace. Like fx's own patching, a session is process-wide: traces running at the
same time in several threads are no more supported than fx supports them. The module-level names fx patches per trace (``torch.fx.wrap``-ed functions)
are cheap dictionary writes and stay fx's.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch.fx._symbolic_trace as fx_trace
from torch import nn

__all__ = ["dispatching", "trace_session", "traced_root"]

# fx's mark on a patched method: found on the current one, fx does not patch it again.
_MARK = "__fx_already_patched"

# The fx internals the dispatchers stand in for (torch 2.x). A torch without one of them gets
# no session: fx then patches per trace, as outside a session (slower, the same graphs).
_FX_INTERNALS = (
    "_orig_module_call",
    "_orig_module_getattr",
    "_autowrap_check",
    "_get_is_fx_tracing",
    "CURRENT_PATCHER",
)
SUPPORTED = all(hasattr(fx_trace, name) for name in _FX_INTERNALS)

_local = threading.local()  # .tracer: the retrofit tracer of this thread's running trace
# The methods the dispatchers replaced (kept after the session: a dispatcher that another
# thread's fx trace put back after the session ended still passes calls on to them).
_installed: dict[str, Any] = {}
_depth = 0  # trace_session bodies running (nested ones install nothing)
_owner: int | None = None  # the thread whose session installed the dispatchers


def _tracer() -> Any:
    tracer = getattr(_local, "tracer", None)
    # Not while the tracer runs real code (the concretizer's evaluation turns the flag off).
    return tracer if tracer is not None and fx_trace._get_is_fx_tracing() else None


def _traced_call(
    tracer: Any, module: nn.Module, run: Callable[..., Any], args: Any, kwargs: Any
) -> Any:
    """A module call handed to ``tracer``, as fx's own wrapper does it (with fx's autowrap check
    of the callee's globals); ``run(module, ...)`` is the call as written, for a traced-through
    module."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        return run(module, *args, **kwargs)

    patcher = fx_trace.CURRENT_PATCHER
    if patcher is not None:
        scope = getattr(getattr(module, "forward", module), "__globals__", {})
        fx_trace._autowrap_check(patcher, scope, tracer._autowrap_function_ids)
    return tracer.call_module(module, forward, args, kwargs)


def _module_call(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    tracer = _tracer()
    if tracer is None:
        return _installed["__call__"](module, *args, **kwargs)
    return _traced_call(tracer, module, fx_trace._orig_module_call, args, kwargs)


def _module_getattr(module: nn.Module, attr: str) -> Any:
    tracer = _tracer()
    if tracer is None:
        return _installed["__getattr__"](module, attr)
    value = fx_trace._orig_module_getattr(module, attr)
    return tracer.getattr(attr, value, tracer.parameter_proxies)


_DISPATCHERS: dict[str, Callable[..., Any]] = {
    "__call__": functools.wraps(nn.Module.__call__)(_module_call),
    "__getattr__": functools.wraps(nn.Module.__getattr__)(_module_getattr),
}

# nn.Module's own methods, for the session that patches the model's classes only.
_CALL = nn.Module.__dict__["__call__"]
_GETATTR = nn.Module.__dict__["__getattr__"]
_CALL_IMPL = nn.Module.__dict__.get("_call_impl")
# nn.Module.__call__ reaching _call_impl as an attribute (torch 2.x: ``_wrapped_call_impl``).
_CALL_IMPL_ROUTED = _CALL_IMPL is not None and _CALL is nn.Module.__dict__.get("_wrapped_call_impl")


def _call_impl(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``nn.Module._call_impl`` in a session that patches the model's classes: a module call of
    this thread's retrofit trace goes to its tracer, any other call runs as written."""
    tracer = _tracer()
    # A plain fx trace started inside the retrofit one patched ``nn.Module.__call__`` with its
    # own wrapper, which reaches this through the method it replaced: the call is that trace's.
    if tracer is None or nn.Module.__dict__["__call__"] is not _CALL:
        return _CALL_IMPL(module, *args, **kwargs)
    # _CALL_IMPL, not nn.Module.__call__: that would come back here.
    return _traced_call(tracer, module, _CALL_IMPL, args, kwargs)


def _class_getattr(module: nn.Module, attr: str) -> Any:
    """``__getattr__`` of the model's classes in such a session (``_module_getattr``, unless a
    plain fx trace inside the retrofit one has patched ``nn.Module.__getattr__``: its read)."""
    current = nn.Module.__dict__["__getattr__"]
    if current is not _GETATTR:
        return current(module, attr)
    return _module_getattr(module, attr)


# The functions fx finds on nn.Module while a session is running: the dispatchers, or nn.Module's
# own methods when only the model's classes are patched.
_marked: tuple[Callable[..., Any], ...] = tuple(_DISPATCHERS.values())


def _mark(value: bool) -> None:
    for fn in _marked:
        setattr(fn, _MARK, value)


_mark(False)


def _model_classes(model: nn.Module) -> list[type] | None:
    """The classes to assign ``__getattr__`` on for a session over ``model``: the classes of its
    modules, less those with an ancestor among them. A module held outside the tree (a list
    attribute) needs none: its call is one opaque node, and fx's read of its attributes finds no
    parameter of the model's to proxy either. None where this cannot stand in for patching
    ``nn.Module``: a class with a ``__getattr__`` or ``_call_impl`` of its own (fx's patched
    ``__getattr__`` is reached through it; assigning over it would skip it), or a compiled
    module (its call does not reach ``_call_impl``)."""
    if not _CALL_IMPL_ROUTED:
        return None
    found: set[type] = set()
    for m in model.modules():
        if m.__dict__.get("_compiled_call_impl") is not None:
            return None
        found.add(type(m))
    if nn.Module in found:  # a bare nn.Module() holder: its class is every class's
        return None
    for cls in found:
        if cls.__getattr__ is not _GETATTR or cls._call_impl is not _CALL_IMPL:
            return None
    return [c for c in found if not any(a in found for a in c.__mro__[1:])]


@contextmanager
def trace_session(model: nn.Module | None = None) -> Iterator[None]:
    """While the body runs, this thread's retrofit traces reuse one patching (other threads'
    traces patch for themselves, as fx does): of ``model``'s classes where
    :func:`_model_classes` allows, else of ``nn.Module``.

    Installs nothing when nested, while an fx trace runs, or when ``nn.Module``'s methods are
    fx's wrappers (another trace is patching them).
    """
    global _depth, _owner, _marked
    current = {name: nn.Module.__dict__.get(name) for name in _DISPATCHERS}
    if (
        not SUPPORTED
        or _depth
        or fx_trace._get_is_fx_tracing()
        or any(getattr(fn, _MARK, None) for fn in current.values())
        or current != {"__call__": _CALL, "__getattr__": _GETATTR}
    ):
        yield
        return
    classes = _model_classes(model) if model is not None else None
    _installed.update(current)
    if classes is None:
        for name, fn in _DISPATCHERS.items():
            setattr(nn.Module, name, fn)
    else:
        own = [(cls, cls.__dict__.get("__getattr__")) for cls in classes]
        for cls, _ in own:
            cls.__getattr__ = _class_getattr
        nn.Module._call_impl = _call_impl
        _marked = (_CALL, _GETATTR)
    _mark(False)
    _depth, _owner = 1, threading.get_ident()
    try:
        yield
    finally:
        _depth, _owner = 0, None
        if classes is None:
            for name, fn in current.items():
                setattr(nn.Module, name, fn)
        else:
            nn.Module._call_impl = _CALL_IMPL
            for cls, fn in own:
                if fn is None:
                    del cls.__getattr__
                else:
                    cls.__getattr__ = fn
            for fn in _marked:  # nn.Module's own methods: left as they were, unmarked
                fn.__dict__.pop(_MARK, None)
            _marked = tuple(_DISPATCHERS.values())


@contextmanager
def dispatching(tracer: Any) -> Iterator[None]:
    """Around one trace by ``tracer``: inside a session, the dispatchers route this thread's
    module calls and attribute reads to it, and fx finds them already patched."""
    if not _depth or _owner != threading.get_ident():
        yield
        return
    previous = getattr(_local, "tracer", None)
    _local.tracer = tracer
    _mark(True)
    try:
        yield
    finally:
        _mark(False)
        _local.tracer = previous


def traced_root(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (the forward fx is about to trace) unmarking the dispatchers first: fx has done
    its patching by then, and an fx trace started inside this one must patch for itself."""

    @functools.wraps(fn)
    def root(*args: Any, **kwargs: Any) -> Any:
        _mark(False)
        return fn(*args, **kwargs)

    return root
