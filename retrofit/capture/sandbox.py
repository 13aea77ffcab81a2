"""Run model code for analysis without letting it change the model.

Tracing or probing a forward executes the model's Python code, and some of it writes to the
model: HF LeViT caches its attention biases in a dict on the module (during an fx trace the
cache would keep a Proxy from that trace, and the next trace reads it back: ``KeyError:
getitem_6``), fx adds ``_tensor_constant0`` attributes to the root it traces, other code
memoises shapes or masks. ``retrofit.plan`` promises not to mutate what it is given, so every
trace and every recording forward runs inside :func:`preserved`, which restores each module's
attributes — the values, and the contents of the dicts, lists and sets they hold — as they
were. Small buffers (at most :data:`SMALL_BUFFER` elements: counters such as BatchNorm's
``num_batches_tracked``) are also restored by value: fx does not proxy buffers, so a BatchNorm
subclass traced in training mode really runs ``self.num_batches_tracked.add_(1)``, and a lint
must change nothing. Other tensor data is not copied: code that writes into a large parameter or
buffer in place while being read is outside what this guards.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = [
    "SMALL_BUFFER",
    "Snapshot",
    "mode",
    "preserved",
    "set_training",
    "unchanged",
    "young_objects_only",
]

SMALL_BUFFER = 64

_CONTAINERS = (dict, list, set)


_EMPTY = ()


def _snapshot(module: nn.Module) -> dict[str, tuple[Any, Any]]:
    # Most containers of a module are empty hook dicts: remember them as empty, copy the rest.
    return {
        k: (v, (v.copy() if v else _EMPTY) if isinstance(v, _CONTAINERS) else None)
        for k, v in module.__dict__.items()
    }


def _restore(module: nn.Module, saved: dict[str, tuple[Any, Any]]) -> None:
    state = module.__dict__
    if state.keys() != saved.keys():
        for k in [k for k in state if k not in saved]:
            del state[k]
    for k, (value, contents) in saved.items():
        if state.get(k, _EMPTY) is not value:
            state[k] = value
        if contents is _EMPTY:
            if value:
                value.clear()
        elif contents is not None:
            # Contents restored unconditionally: comparing them would compare tensors.
            if isinstance(value, list):
                value[:] = contents
            else:
                value.clear()
                value.update(contents)


class Snapshot:
    """Every module under ``root`` as it is now: its attributes and their containers' contents
    (children, parameters, buffers, hooks, caches), to put back with :meth:`restore`.

    ``retrofit.apply`` takes one before it changes anything; whatever fails afterwards, restoring
    it hands the model back exactly as it came: same forward, same modules, same state.
    """

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.saved = [(m, _snapshot(m)) for m in root.modules()]

    def restore(self) -> None:
        for module, state in self.saved:
            _restore(module, state)


# Roots known to be as a snapshot holds them whenever no preserved body runs (``unchanged``).
_unchanged: dict[int, Snapshot] = {}
_preserving = 0  # preserved bodies running


@contextmanager
def unchanged(snapshot: Snapshot | None) -> Iterator[None]:
    """While the body runs, ``snapshot.root`` is as ``snapshot`` holds it except inside
    :func:`preserved` bodies (the caller's promise: the body only reads the model, as a plan
    does). A :func:`preserved` of that root then restores to ``snapshot`` instead of taking a
    snapshot of its own: ``apply`` takes one before it changes anything, and the trace's
    sandbox would take the same one again (half a millisecond on a small model). None: no
    promise (the model was changed since, as by stripping an earlier retrofit)."""
    if snapshot is None or id(snapshot.root) in _unchanged:
        yield
        return
    _unchanged[id(snapshot.root)] = snapshot
    try:
        yield
    finally:
        del _unchanged[id(snapshot.root)]


@contextmanager
def preserved(root: nn.Module) -> Iterator[None]:
    """Restore every module under ``root`` (attributes and container contents, and the values of
    small buffers) on exit."""
    global _preserving
    # Inside another preserved body the model may be mid-way through a forward's writes: what
    # is restored on exit is the state on entry, not the promised one.
    snapshot = None if _preserving else _unchanged.get(id(root))
    if snapshot is None or snapshot.root is not root:
        snapshot = Snapshot(root)
    small = [
        (b, b._version, b.detach().clone())
        for b in root.buffers()
        if b is not None
        and not isinstance(b, nn.parameter.UninitializedTensorMixin)  # a lazy module's
        and b.device.type != "meta"
        and b.numel() <= SMALL_BUFFER
    ]
    _preserving += 1
    try:
        yield
    finally:
        _preserving -= 1
        snapshot.restore()
        for buffer, version, value in small:
            if buffer._version != version:
                with torch.no_grad():
                    buffer.copy_(value)


_MODULE_SETATTR = nn.Module.__setattr__


def set_training(module: nn.Module, flag: bool) -> None:
    """``module.training = flag`` without ``nn.Module.__setattr__``'s registry checks (a bool
    is never a parameter, a buffer or a module; the checks are most of the cost of flipping
    every module of a model, which an apply does several times). A class with a
    ``__setattr__`` of its own (TorchScript's) is set through it."""
    if type(module).__setattr__ is _MODULE_SETATTR:
        object.__setattr__(module, "training", flag)
    else:
        module.training = flag


@contextmanager
def mode(root: nn.Module, training: bool) -> Iterator[None]:
    """Every module under ``root`` in training (True) or eval (False) mode, restored on exit.

    Flags are set directly: a model's own ``train()``/``eval()`` override (freezing BN, say) is
    the user's training policy, not something an analysis or a check should run.
    """
    flags = [(m, m.training) for m in root.modules()]
    for m, _ in flags:
        set_training(m, training)
    try:
        yield
    finally:
        for m, flag in flags:
            set_training(m, flag)


_freeze_depth = 0  # young_objects_only bodies running (nested calls do nothing)


@contextmanager
def young_objects_only() -> Iterator[None]:
    """While the body runs, the garbage collector looks only at objects created in it.

    Reading and rewriting a model allocates many small container objects that outlive the young
    generations (fx nodes and graphs, recorded calls, snapshots), and each full collection that
    triggers walks every object of the process — torch's, timm's, the model's: some 400,000 in
    a process that imported timm — to free nothing: a third to a half of ``apply`` on a small
    model. ``gc.freeze`` sets what exists on entry aside for the duration (cycles ``apply``
    itself makes are still collected) and ``gc.unfreeze`` puts it back. Skipped when the process
    froze objects of its own (unfreezing would release those too) or turned collection off.
    """
    global _freeze_depth
    # Nested (``plan`` inside ``apply``): already frozen by us. Asked before anything else
    # because ``gc.get_freeze_count`` walks the frozen list: 30 ms with 400,000 objects set aside.
    if _freeze_depth or not gc.isenabled() or gc.get_freeze_count():
        yield
        return
    gc.freeze()
    _freeze_depth += 1
    try:
        yield
    finally:
        _freeze_depth -= 1
        gc.unfreeze()
