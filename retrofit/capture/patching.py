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


def _module_call(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    tracer = _tracer()
    if tracer is None:
        return _installed["__call__"](module, *args, **kwargs)

    def forward(*args: Any, **kwargs: Any) -> Any:
        return fx_trace._orig_module_call(module, *args, **kwargs)

    patcher = fx_trace.CURRENT_PATCHER
    if patcher is not None:
        scope = getattr(getattr(module, "forward", module), "__globals__", {})
        fx_trace._autowrap_check(patcher, scope, tracer._autowrap_function_ids)
    return tracer.call_module(module, forward, args, kwargs)


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


def _mark(value: bool) -> None:
    for fn in _DISPATCHERS.values():
        setattr(fn, _MARK, value)


_mark(False)


@contextmanager
def trace_session() -> Iterator[None]:
    """While the body runs, this thread's retrofit traces reuse one patching of ``nn.Module``
    (other threads' traces patch for themselves, as fx does).

    Installs nothing when nested, while an fx trace runs, or when ``nn.Module``'s methods are
    fx's wrappers (another trace is patching them).
    """
    global _depth, _owner
    current = {name: nn.Module.__dict__.get(name) for name in _DISPATCHERS}
    if (
        not SUPPORTED
        or _depth
        or fx_trace._get_is_fx_tracing()
        or any(getattr(fn, _MARK, None) is not None for fn in current.values())
    ):
        yield
        return
    _installed.update(current)
    for name, fn in _DISPATCHERS.items():
        setattr(nn.Module, name, fn)
    _depth, _owner = 1, threading.get_ident()
    try:
        yield
    finally:
        _depth, _owner = 0, None
        for name, fn in current.items():
            setattr(nn.Module, name, fn)


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
