"""The libraries' own drop-path placement, read from their graphs: the oracle for residual sites.

timm and torchvision put drop path (``DropPath``, ``StochasticDepth``) on the residual branches of
many of their models when built with a non-zero rate. Those placements were written by the
models' authors; where one feeds an add, that add's owning module is a block the library
considers residual. retrofit's residual analysis runs on the model built *without* drop path and
must find those blocks.

Two oracles: :func:`library_drop_path_owners` reads the model's fx graph (timm, torchvision);
:func:`drop_path_placement` / :func:`hf_drop_path_owners` watch one real forward, for models fx
cannot trace whole (HF transformers' encoders) — see its docstring for how and its limits.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.overrides import TorchFunctionMode

from retrofit.analysis.dataflow import is_add
from retrofit.analysis.residual import existing_drop_path
from retrofit.capture.sandbox import mode
from retrofit.capture.trace import TraceResult, trace

__all__ = [
    "DropPathPlacement",
    "drop_path_placement",
    "hf_drop_path_owners",
    "is_drop_path_module",
    "library_drop_path_owners",
]


def _through_scales(node: fx.Node, gm: fx.GraphModule, hops: int = 3) -> list[fx.Node]:
    """Users of ``node``, looking through layer scales applied after the drop path
    (MetaFormer/PoolFormer: ``res_scale(x) + layer_scale(drop_path(mixer(x)))``)."""
    users = list(node.users)
    for _ in range(hops):
        nxt = []
        for u in users:
            scale = u.op == "call_module" and not any(
                p.ndim >= 2 and sum(d > 1 for d in p.shape) >= 2
                for p in gm.get_submodule(str(u.target)).parameters()
            )
            if scale or (u.op == "call_function" and u.target in (operator.mul, torch.mul)):
                nxt.extend(u.users)
            else:
                nxt.append(u)
        users = nxt
    return users


def library_drop_path_owners(model: nn.Module, traced: TraceResult | None = None) -> set[str]:
    """Owners of the adds fed by a library drop-path module in ``model``.

    timm's linear rate schedule gives block 0 a rate of 0, built as an ``nn.Identity`` in the
    drop-path slot. Such a slot counts when the same slot (its name with indices wildcarded) holds
    a real drop-path module in another block; slots that are Identity everywhere (iFormer's
    convolutional position encoding, built with rate 0 by design) do not.
    """
    traced = traced or trace(model)
    slots: list[tuple[str, str, bool]] = []  # (add owner, slot pattern, real drop path?)
    for part in traced.parts:
        gm = part.graph_module
        for node in gm.graph.nodes:
            kind = existing_drop_path(node, gm)
            if kind is None:
                continue
            pattern = re.sub(r"\.\d+(?=\.|$)", ".*", f"{part.prefix}.{node.target}")
            for user in _through_scales(node, gm):
                # ``out += identity_out`` with ``identity_out = 0`` (MobileOne without an
                # identity branch) is no residual: both operands must be graph values.
                if is_add(user) and all(isinstance(a, fx.Node) for a in user.args[:2]):
                    slots.append((user.meta["owner"], pattern, kind != "identity placeholder"))
    real = {pattern for _, pattern, is_real in slots if is_real}
    return {owner for owner, pattern, _ in slots if pattern in real}


# --- by execution: any library's drop path, found while the model runs --------------------------
#
# The graph-based oracle above needs an fx trace of the model built with drop path. Most HF
# transformers encoders cannot be traced that way today (issue 10), so an oracle built on the
# same tracer as the analysis it judges would be blind exactly where the analysis is. This one
# watches one real forward instead: a ``TorchFunctionMode`` sees every torch operation, forward
# hooks keep the stack of modules whose ``forward`` is running, and a drop-path module's output
# is followed through the operations that keep it "the branch" until it reaches an add.

_ADDS = {torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__}
_ADDS |= {torch.Tensor.__radd__, torch.Tensor.__iadd__}
# Operations after which the value is still the branch: shape changes, slicing, and scaling by a
# constant or a per-channel layer scale (``x + drop_path(gamma * f(x))`` and
# ``x + gamma * drop_path(f(x))`` are the same placement).
_SHAPE_OPS = {
    torch.reshape, torch.flatten, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
    torch.Tensor.reshape, torch.Tensor.view, torch.Tensor.view_as, torch.Tensor.permute,
    torch.Tensor.transpose, torch.Tensor.flatten, torch.Tensor.contiguous, torch.Tensor.squeeze,
    torch.Tensor.unsqueeze, torch.Tensor.__getitem__, torch.Tensor.to, torch.Tensor.type_as,
}  # fmt: skip
_SCALE_OPS = {
    torch.mul, torch.div, torch.Tensor.mul, torch.Tensor.div, torch.Tensor.__mul__,
    torch.Tensor.__rmul__, torch.Tensor.__truediv__, torch.Tensor.mul_, torch.Tensor.div_,
}  # fmt: skip
# Sources of a per-sample Bernoulli mask written inline (``x + f(x) * rnd`` with
# ``rnd = torch.rand(B, 1, 1).ge_(p)``: HF LeViT's LevitResidualLayer, timm's functional drop_path).
_RANDOM = {torch.rand, torch.rand_like, torch.bernoulli, torch.Tensor.bernoulli_}


def is_drop_path_module(module: nn.Module) -> bool:
    """A library's drop-path module, by class name: timm's ``DropPath``, torchvision's
    ``StochasticDepth``, HF's per-family ``BeitDropPath``, ``SwinDropPath``, ``ConvNextDropPath``…"""
    name = type(module).__name__
    return name.endswith("DropPath") or name == "StochasticDepth"


def drop_path_rate_of(module: nn.Module) -> float:
    """The drop probability a drop-path module holds (``drop_prob``: timm and HF; ``p``:
    torchvision), 0.0 if none is found."""
    for attr in ("drop_prob", "p", "drop_rate", "drop_path_rate"):
        value = getattr(module, attr, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return 0.0


def _slot_pattern(name: str) -> str:
    return re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)", "*", name)


@dataclass
class DropPathPlacement:
    """Where a library applies drop path in ``model``, seen in one training-mode forward.

    ``owners``: modules whose ``forward`` adds a drop-path output to something (the residual
    blocks, in the same sense as retrofit's site owners). ``modules``: drop-path modules built
    with a non-zero rate. ``not_called``: of those, the ones the forward never ran (built but
    unused). ``not_on_add``: the ones that ran but whose output reached no add (Cvt drops the
    block's output after its own add; a drop path before a learned map). ``inline``: owners of an
    add whose operand is multiplied by a per-sample random mask made in the forward itself, with
    no module (HF LeViT). ``slots``: (owner, slot pattern, real?) for every add found.
    """

    owners: set[str] = field(default_factory=set)
    modules: list[str] = field(default_factory=list)
    not_called: list[str] = field(default_factory=list)
    not_on_add: list[str] = field(default_factory=list)
    inline: set[str] = field(default_factory=set)
    slots: list[tuple[str, str, bool]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "owners": sorted(self.owners),
            "modules": list(self.modules),
            "not_called": list(self.not_called),
            "not_on_add": list(self.not_on_add),
            "inline": sorted(self.inline),
        }


class _Watch(TorchFunctionMode):
    """Follows drop-path outputs and random masks to adds.

    ``marks``: tensor id → (slot, tick when marked); ``stack``: the running forwards as
    (module name, tick when its forward began). A marked operand of an add is the *branch* only
    if it was marked during the add owner's own forward: a block that applies drop path to its
    whole output (CvT) hands the next block a marked tensor as its *shortcut*, which is not a
    drop path on that block's branch.
    """

    def __init__(self, batch: int):
        super().__init__()
        self.batch = batch
        self.stack: list[tuple[str, int]] = []
        self.ticks = 0
        self.marks: dict[int, tuple[str, int]] = {}
        self.random: set[int] = set()
        self.alive: list[torch.Tensor] = []  # marked tensors stay alive: ids are never reused
        self.adds: list[tuple[str, str]] = []  # (owner, slot)

    def tick(self) -> int:
        self.ticks += 1
        return self.ticks

    def owner(self) -> str:
        return self.stack[-1][0] if self.stack else ""

    def mark(self, tensor: torch.Tensor, slot: str) -> None:
        self.marks[id(tensor)] = (slot, self.tick())
        self.alive.append(tensor)

    def _per_sample(self, t: torch.Tensor) -> bool:
        return t.ndim >= 1 and t.shape[0] == self.batch and t.numel() == self.batch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        marked = [self.marks[id(a)][0] for a in tensors if id(a) in self.marks]
        if func in _ADDS and marked and len(tensors) == 2:
            began = self.stack[-1][1] if self.stack else 0
            branch = [
                self.marks[id(a)]
                for a in tensors
                if id(a) in self.marks and self.marks[id(a)][1] > began
            ]
            if branch:  # the latest-marked operand is the branch
                self.adds.append((self.owner(), max(branch, key=lambda m: m[1])[0]))
        if not isinstance(out, torch.Tensor):
            return out
        if func in _RANDOM or (tensors and all(id(a) in self.random for a in tensors)):
            # the mask's own arithmetic (``floor(rand + keep)``, ``ge_(p).div(1 - p)``)
            self.random.add(id(out))
            self.alive.append(out)
            return out
        if func in _ADDS:
            return out
        if marked and func in _SHAPE_OPS:
            self.mark(out, marked[0])
        elif func in _SCALE_OPS and len(tensors) <= 2:
            rnd = [a for a in tensors if id(a) in self.random and self._per_sample(a)]
            others = [a for a in tensors if id(a) not in self.random]
            if rnd and len(others) == 1:
                # branch × per-sample random mask: an inline drop path in this module's forward
                self.mark(out, f"inline:{self.owner()}")
            elif marked and all(
                id(a) in self.marks or sum(d > 1 for d in a.shape) <= 1 for a in tensors
            ):
                self.mark(out, marked[0])  # a layer scale or a constant
        return out


def drop_path_placement(model: nn.Module, example_input: Any) -> DropPathPlacement:
    """Where ``model`` (built *with* a non-zero drop-path rate) applies drop path, by execution.

    How: one forward of ``model`` in training mode on ``example_input`` (a tensor, a tuple of
    positional inputs, or a dict of keyword inputs), under ``torch.no_grad``. Forward pre-/post-
    hooks on every module keep the stack of running forwards. A forward hook on each drop-path
    module (:func:`is_drop_path_module`), and on each ``nn.Identity`` in the same slot as one
    (the linear schedule gives block 0 rate 0, and timm and HF then build an ``nn.Identity``),
    marks its output tensor; a ``TorchFunctionMode`` carries the mark through shape operations,
    slicing and scaling by a constant or a per-channel layer scale, and records every add of two
    tensors one of which was marked during the forward of the module on top of the stack (the
    add's owner; a tensor marked earlier, in another block, is that add's shortcut). HF names its
    drop-path class per family (``BeitDropPath``, ``SwinDropPath``, ``ConvNextDropPath``, …,
    43 classes in transformers 5.24); SwiftFormer's conv encoder calls an ``nn.Dropout``
    ``drop_path`` and PoolFormer uses a ``PoolFormerDropPath`` as the MLP's dropout: neither is a
    drop path on a residual branch, and neither is counted.
    An Identity slot counts only where its pattern (indices as ``*``) holds a real drop path in
    another block, as in :func:`library_drop_path_owners`. An add whose operand is multiplied by a
    per-sample random mask made inline (``torch.rand`` / ``bernoulli_``, shape ``(B, 1, …)``) is
    also a drop path (HF LeViT).

    Limits: only the path this input takes is seen (a branch not taken by this forward, or a block
    this input size skips, is missed); a drop path whose output goes through a learned map, a
    concatenation or a reduction before the add is "not on an add" (Timesformer's temporal
    branch goes through a Linear); an add written without a torch operation (a C++ extension) is
    invisible. Buffers (BatchNorm running statistics) and every module's training flag are
    restored afterwards; the model's parameters are not touched.
    """
    result = DropPathPlacement()
    real = {
        n: m
        for n, m in model.named_modules()
        if is_drop_path_module(m) and drop_path_rate_of(m) > 0
    }
    result.modules = list(real)
    real_patterns = {_slot_pattern(n) for n in real}
    slot_modules = {
        n: m
        for n, m in model.named_modules()
        if n in real
        or (
            (is_drop_path_module(m) or isinstance(m, nn.Identity))
            and _slot_pattern(n) in real_patterns
        )
    }
    watch = _Watch(_batch_of(example_input))
    called = _watched_forward(model, example_input, slot_modules, watch)
    reached = set()
    for owner, slot in watch.adds:
        if slot.startswith("inline:"):
            result.inline.add(owner)
            result.slots.append((owner, _slot_pattern(owner), True))
        else:
            reached.add(slot)
            result.slots.append((owner, _slot_pattern(slot), slot in real))
    real_slot_patterns = {p for _, p, is_real in result.slots if is_real}
    result.owners = {o for o, p, _ in result.slots if p in real_slot_patterns}
    result.not_called = [n for n in real if n not in called]
    result.not_on_add = [n for n in real if n in called and n not in reached]
    return result


def _watched_forward(
    model: nn.Module, example_input: Any, slot_modules: dict[str, nn.Module], watch: _Watch
) -> set[str]:
    """One training-mode forward under ``watch``, with the stack of running forwards kept and
    every slot module's output marked; returns the slots that ran. Training flags and buffers
    are restored afterwards."""
    names = {id(m): n for n, m in reversed(list(model.named_modules()))}
    called: set[str] = set()
    handles = []

    def push(module: nn.Module, args: Any) -> None:
        watch.stack.append((names.get(id(module), "?"), watch.tick()))

    def pop(module: nn.Module, args: Any, output: Any) -> None:
        if watch.stack:
            watch.stack.pop()

    def slot_hook(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            called.add(name)
            if isinstance(output, torch.Tensor):
                out = output.view_as(output)  # a new tensor object: an Identity returns its input
                watch.mark(out, name)
                return out
            return output

        return hook

    for module in model.modules():
        handles.append(module.register_forward_pre_hook(push))
    for name, module in slot_modules.items():
        handles.append(module.register_forward_hook(slot_hook(name)))
    for module in model.modules():
        handles.append(module.register_forward_hook(pop, always_call=True))
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with mode(model, True), torch.no_grad(), watch:
            if isinstance(example_input, dict):
                model(**example_input)
            elif isinstance(example_input, tuple):
                model(*example_input)
            else:
                model(example_input)
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    return called


def _batch_of(example_input: Any) -> int:
    if isinstance(example_input, torch.Tensor):
        return int(example_input.shape[0]) if example_input.ndim else 1
    values = example_input.values() if isinstance(example_input, dict) else example_input
    for v in values:
        if isinstance(v, torch.Tensor) and v.ndim:
            return int(v.shape[0])
    return 1


def hf_drop_path_owners(model: nn.Module, example_input: Any) -> set[str]:
    """Owners of the adds fed by HF's own drop path (``BeitDropPath``, ``SwinDropPath``, …) in
    ``model`` built with ``drop_path_rate > 0`` in its config: the HF counterpart of
    :func:`library_drop_path_owners`, found by execution (:func:`drop_path_placement`), so it does
    not need an fx trace of the model."""
    return drop_path_placement(model, example_input).owners
