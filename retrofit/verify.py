"""What a rewrite guarantees, checked: eval equivalence and liveness.

House rules: never hand back a model whose inference output silently differs from the original
(``apply`` records the original's eval output on a probe input before rewriting and compares
after: :func:`compare`), nor one whose inserted regularizers silently never run (one training
forward on the probe must call every inserted layer and every reused slot: :func:`check_live`).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from retrofit.errors import VerifyError
from retrofit.graph.probe import probe_input_size
from retrofit.graph.sandbox import mode
from retrofit.training_call import TrainingCall, as_training_call

__all__ = [
    "check_live",
    "compare",
    "eval_output",
    "paper_gates_neutral",
    "probe_input",
    "probe_size",
]


def probe_size(model: nn.Module) -> tuple[int, ...]:
    """Input size (C, H, W) the model expects (timm's config, a ViT's image size, else 224²)."""
    return probe_input_size(model)


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


def probe_input(model: nn.Module, batch: int = 2, seed: int = 0) -> torch.Tensor:
    device, dtype = _device_dtype(model)
    if device.type == "meta":
        raise VerifyError(
            "verify=True needs real weights, but the model is on the meta device "
            "(use retrofit.plan for a dry run, or apply(..., verify=False))"
        )
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *probe_size(model), generator=generator)
    return x.to(device=device, dtype=dtype)


def run(model: nn.Module, x: Any) -> Any:
    """Call ``model`` on a probe: a tuple is positional arguments, a dict keyword arguments."""
    if isinstance(x, tuple):
        return model(*x)
    if isinstance(x, dict):
        return model(**x)
    return model(x)


def eval_output(model: nn.Module, x: Any, *, watch: Sequence[str] = ()) -> list[torch.Tensor]:
    """The model's eval-mode output on ``x`` as a flat list of tensors (train flags restored),
    followed by the outputs of the submodules named in ``watch`` (a detector's backbone and
    heads: see ``graph/detection.py``), in call order."""
    seen: list[Any] = []
    handles = [
        model.get_submodule(name).register_forward_hook(lambda _m, _i, o: seen.append(o))
        for name in watch
    ]
    try:
        with mode(model, False), torch.no_grad():
            out = run(model, x)
    finally:
        for handle in handles:
            handle.remove()
    leaves, _ = tree_flatten([out, *seen])
    return [t.detach().clone() for t in leaves if isinstance(t, torch.Tensor)]


@contextmanager
def paper_gates_neutral(model: nn.Module) -> Iterator[None]:
    """Gates with ``scaling="paper"`` scale the branch by p_l in eval *by design*
    (H = ReLU(p_l·f_l + id)); verification checks the rewrite with them at p_l = 1."""
    saved = []
    for m in model.modules():
        if getattr(m, "scaling", None) == "paper" and hasattr(m, "survival"):
            saved.append((m, m.survival))
            m.survival = 1.0
    try:
        yield
    finally:
        for m, p in saved:
            m.survival = p


def compare(
    reference: list[torch.Tensor],
    output: list[torch.Tensor],
    *,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> None:
    """Raise VerifyError naming the first output that differs."""
    if len(reference) != len(output):
        raise VerifyError(
            f"the rewritten model returns {len(output)} tensors, the original {len(reference)}"
        )
    for i, (a, b) in enumerate(zip(reference, output, strict=True)):
        if a.shape != b.shape:
            raise VerifyError(
                f"output {i}: shape {tuple(b.shape)} after rewrite, {tuple(a.shape)} before"
            )
        if not torch.allclose(a.float(), b.float(), rtol=rtol, atol=atol, equal_nan=True):
            diff = (a.float() - b.float()).abs().max().item()
            raise VerifyError(
                f"output {i}: eval output changed by the rewrite (max |diff| = {diff:.3g})"
            )


# What every nn.Module carries (children, parameters, hooks…): not the layer's own settings.
_MODULE_INTERNALS = frozenset(nn.Module().__dict__)


@contextmanager
def _checking_only(model: nn.Module, layers: list[nn.Module]) -> Iterator[None]:
    """A training forward that leaves no trace: buffers (BatchNorm statistics), the RNG streams
    and the inserted layers' counters and draw counters are put back afterwards."""
    buffers = [(b, b.detach().clone()) for b in model.buffers() if b is not None]
    states = [
        (m, {k: copy.copy(v) for k, v in m.__dict__.items() if k not in _MODULE_INTERNALS})
        for m in layers
    ]
    flags = [(m, m.training) for m in model.modules()]
    devices = sorted({b.device.index or 0 for b, _ in buffers if b.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), warnings.catch_warnings():
            # What the layers tell a user's training loop (a DropBlock whose schedule was
            # never set) is not news during a check.
            warnings.simplefilter("ignore")
            yield
    finally:
        for b, saved in buffers:
            b.copy_(saved)
        for m, state in states:
            m.__dict__.update(state)
        for m, flag in flags:
            m.training = flag


def check_live(model: nn.Module, call: TrainingCall | Any, modules: dict[str, str]) -> None:
    """One training-mode forward — ``call``, a :class:`~retrofit.training_call.TrainingCall`
    (or an input, as ``example_input``) — must call every module named in ``modules`` (name →
    what it is, for the message): the inserted layers and the reused drop-path slots.

    Raises VerifyError naming each module that was never called and its site. Nothing the
    forward does persists (see :func:`_checking_only`).
    """
    calls = dict.fromkeys(modules, 0)
    handles = []
    layers = []
    for name in modules:
        module = model.get_submodule(name)
        layers.append(module)

        def count(*_: Any, name: str = name) -> None:
            calls[name] += 1

        handles.append(module.register_forward_pre_hook(count))
    try:
        with _checking_only(model, layers):
            for m in model.modules():
                # Norms with running statistics stay in eval: they decide no control flow, and
                # in training a probe of one sample (or a 1×1 map) is an error for them.
                m.training = not isinstance(m, nn.modules.batchnorm._NormBase)
            for layer in layers:
                # Liveness asks "is it called", not "what does it draw": every branch is kept,
                # so outlined branches run too and subset mode never leaves a BatchNorm one row.
                if isinstance(getattr(layer, "survival", None), float):
                    layer.survival = 1.0
            as_training_call(call).run(model)
    finally:
        for handle in handles:
            handle.remove()
    dead = [name for name, n in calls.items() if n == 0]
    if dead:
        listed = "; ".join(f"{name} ({modules[name]})" for name in dead[:5])
        more = f" and {len(dead) - 5} more" if len(dead) > 5 else ""
        raise VerifyError(
            f"{len(dead)} of {len(modules)} inserted regularizers are never called in a training "
            f"forward (not live): {listed}{more}"
        )
