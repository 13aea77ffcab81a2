"""Capture by execution: what one real forward passes to every module, and how a call is keyed.

torch.fx traces a forward with its arguments as proxies, or frozen at their defaults. Model code
written in other styles defeats that: a root ``forward(self, pixel_values=None)`` frozen at its
default raises the model's own "You have to specify pixel_values"; a block called as
``block(x, drop_connect_rate=0.2)`` runs a different graph from the one traced with the default;
HF's decorators wrap ``forward`` in ``(*args, **kwargs)``. What each module is *really* called
with is known only by running the model. Torch-Pruning's DepGraph (Fang et al., CVPR 2023) and
torch.export's non-strict mode read models by executing them; this module does the first step
of that: one real forward on the probe input with a pre-hook on every module, which records the
call (:class:`Call`: tensors by reference, other values as given). A tracer can then specialise
a module on that call (``capture/trace.py``), and a rewritten forward can tell whether a later
call is one its code was specialised for (:class:`CallKey`).

The recording forward runs in eval mode under ``no_grad``, on whatever device the model is on
(the meta device included), with the model's attributes restored afterwards
(:func:`retrofit.capture.sandbox.preserved`): it never changes the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn
from torch.utils._pytree import TreeSpec, tree_flatten

from retrofit.capture.sandbox import mode, preserved

__all__ = ["Call", "CallKey", "GUARDS", "NoCall", "record_calls"]

# How much of a tensor argument a specialised graph depends on, least to most: nothing (the
# code only passed it on), its rank (``B, L, C = x.shape``), its rank, dtype and device
# (``torch.finfo(q.dtype).max``, ``if x.is_cuda``), or its shape, dtype and device
# (``if H % 7``, ``math.ceil(W / 2)``).
GUARDS = ("none", "rank", "dtype", "shape")


class NoCall(LookupError):
    """No recorded call for a module: the recording forward failed (the message says why), or the
    module did not run in it."""


@dataclass
class Call:
    """One call of a module: positional and keyword arguments exactly as the caller gave them."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def flatten(self) -> tuple[list[Any], TreeSpec]:
        """The arguments as pytree leaves (tensors, None, numbers, other objects) and their spec."""
        return tree_flatten((self.args, self.kwargs))

    def describe(self) -> str:
        """A short, readable form for error messages: ``(Tensor[2, 8, 4, 4], state=None)``."""

        def one(value: Any) -> str:
            if isinstance(value, Tensor):
                return f"Tensor{list(value.shape)}"
            text = repr(value)
            return text if len(text) <= 40 else text[:37] + "..."

        parts = [one(a) for a in self.args] + [f"{k}={one(v)}" for k, v in self.kwargs.items()]
        return "(" + ", ".join(parts) + ")"


def _same(value: Any, expected: Any) -> bool:
    """Whether a non-tensor argument is the one a graph was specialised on (it is baked in)."""
    if value is expected:
        return True
    if type(value) is not type(expected) or isinstance(value, Tensor):
        return False
    try:
        return bool(value == expected)
    except Exception:  # an object whose == is not a plain bool (arrays, proxies)
        return False


@dataclass(frozen=True)
class CallKey:
    """What a specialised graph assumed about its call: the pytree structure of the arguments,
    which leaves are tensors (placeholders), the other leaves' values (baked into the graph) and,
    per ``guard``, the tensors' ranks or shapes/dtypes/devices."""

    spec: TreeSpec
    leaves: tuple[Any, ...]  # per leaf: a tensor descriptor, or the baked value
    tensors: tuple[bool, ...]
    guard: str = "none"

    @staticmethod
    def describe_tensor(t: Tensor, guard: str) -> Any:
        if guard == "shape":
            return (tuple(t.shape), t.dtype, t.device.type)
        if guard == "dtype":
            return (t.ndim, t.dtype, t.device.type)
        if guard == "rank":
            return t.ndim
        return None

    @classmethod
    def of(cls, leaves: list[Any], spec: TreeSpec, guard: str) -> CallKey:
        tensors = tuple(isinstance(v, Tensor) for v in leaves)
        described = tuple(
            cls.describe_tensor(v, guard) if is_t else v
            for v, is_t in zip(leaves, tensors, strict=True)
        )
        return cls(spec, described, tensors, guard)

    def matches(self, leaves: list[Any], spec: TreeSpec) -> bool:
        """Whether a call with these pytree leaves may run the specialised graph. A torch.fx
        Proxy counts as a tensor whose shape is unknown (someone is tracing the rewritten
        model: lint after apply), so it matches a tensor slot of any guard."""
        if len(leaves) != len(self.leaves) or spec != self.spec:
            return False
        for value, expected, is_tensor in zip(leaves, self.leaves, self.tensors, strict=True):
            if is_tensor:
                if isinstance(value, torch.fx.Proxy):
                    continue
                if not isinstance(value, Tensor):
                    return False
                if self.guard != "none" and self.describe_tensor(value, self.guard) != expected:
                    return False
            elif not _same(value, expected):
                return False
        return True


class _Recorder:
    def __init__(self, names: dict[nn.Module, str], limit: int) -> None:
        self.names = names
        self.limit = limit
        self.calls: dict[str, list[Call]] = {}

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls = self.calls.setdefault(self.names[module], [])
        if len(calls) < self.limit:
            calls.append(Call(tuple(args), dict(kwargs)))


def _iter_named(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    # remove_duplicate=False would visit a shared module twice; its first name is the one the
    # analysis uses for it.
    yield from model.named_modules()


def record_calls(
    model: nn.Module, example_input: Any, *, limit: int = 4, output: list[Any] | None = None
) -> dict[str, list[Call]]:
    """Run ``model`` once on ``example_input`` and return every module's calls (at most ``limit``
    per module, in call order), keyed by qualified name ("" for the root). ``output``, if
    given, receives what the forward returned (the model's eval output on the probe: the
    reference verification compares against, without a forward of its own).

    Eval mode and ``no_grad``: nothing is learned or drawn; the model's attributes (and any
    cache its forward fills) are restored afterwards. Modules that did not run (a training-only
    auxiliary head, an unused branch) have no entry.
    """
    names = {m: n for n, m in _iter_named(model)}
    recorder = _Recorder(names, limit)
    handles = [m.register_forward_pre_hook(recorder, with_kwargs=True, prepend=True) for m in names]
    try:
        # preserved: whatever the forward writes (caches) goes; mode: eval, flags restored
        with preserved(model), mode(model, False), torch.no_grad(), torch.random.fork_rng([]):
            if isinstance(example_input, tuple):
                out = model(*example_input)
            elif isinstance(example_input, dict):
                out = model(**example_input)
            else:
                out = model(example_input)
            if output is not None:
                output.append(out)
    finally:
        for handle in handles:
            handle.remove()
    return recorder.calls
