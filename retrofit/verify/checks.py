"""What a rewrite guarantees, checked: eval equivalence and liveness.

House rules: never hand back a model whose inference output silently differs from the original
(``apply`` records the original's eval output on a probe input before rewriting and compares
after: :func:`compare`), nor one whose inserted regularizers silently never run (a training step on
the probe, forward and backward, under the passes the techniques ask for — stochastic depth's
gates forced onto their kept path — must call every inserted layer and every reused slot, and
the further passes, every gate dropped, must work too: :func:`check_live`).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from retrofit.capture.sandbox import mode, set_training
from retrofit.errors import VerifyError
from retrofit.verify.training_call import TrainingCall, as_training_call

__all__ = [
    "TrainingStepError",
    "check_live",
    "compare",
    "eval_output",
    "output_tensors",
    "Path",
    "training_step_error",
]


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
    heads: see ``capture/detection.py``), in call order."""
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
    return output_tensors([out, *seen])


def output_tensors(out: Any) -> list[torch.Tensor]:
    """A forward's output as a flat list of its tensors (copies)."""
    leaves, _ = tree_flatten(out)
    return [t.detach().clone() for t in leaves if isinstance(t, torch.Tensor)]


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


# One training pass of the liveness check: what it forces (for the message), the layers whose
# state it changes (put back afterwards), and a context that forces it. The techniques' records
# say which passes their layers need (``retrofit.techniques.liveness_paths``).
Path = tuple[str, Sequence[nn.Module], Callable[[], AbstractContextManager[None]]]


@contextmanager
def _checking_only(model: nn.Module, layers: list[nn.Module]) -> Iterator[None]:
    """A training step that leaves no trace: buffers (BatchNorm statistics), the RNG streams,
    the training flags and the inserted layers' counters and draw counters are put back
    afterwards; gradients are taken with ``torch.autograd.grad``, so no ``.grad`` is written."""
    buffers = [(b, b.detach().clone()) for b in model.buffers() if b is not None]
    states = [
        (m, {k: copy.copy(v) for k, v in m.__dict__.items() if k not in _MODULE_INTERNALS})
        for m in layers
    ]
    flags = [(m, m.training) for m in model.modules()]
    devices = sorted({b.device.index or 0 for b, _ in buffers if b.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
            # What the layers tell a user's training loop (a DropBlock whose schedule was
            # never set) is not news during a check.
            warnings.simplefilter("ignore")
            for m in model.modules():
                # Norms with running statistics stay in eval: they decide no control flow, and
                # in training a probe of one sample (or a 1×1 map) is an error for them.
                set_training(m, not isinstance(m, nn.modules.batchnorm._NormBase))
            yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, state in states:
            m.__dict__.update(state)
        for m, flag in flags:
            set_training(m, flag)


def _training_step(
    model: nn.Module, call: TrainingCall, params: list[nn.Parameter] | None = None
) -> list[nn.Parameter] | None:
    """One training forward and, when its loss depends on a trainable parameter, the backward
    (gradients returned by ``autograd.grad`` and dropped). Returns the parameters it
    differentiated for (:func:`_backward_targets`, read after the forward: a lazy module makes
    its parameters there), for the caller's next step to pass back as ``params``."""
    with torch.enable_grad():
        output = call.run(model)
        try:
            loss = call.loss_of(output)
        except TypeError:
            if call.loss is not None:
                raise
            return params  # no floating output (the default loss says so): no backward
        params = _backward_targets(model) if params is None else params
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad or not params:
            return params
        torch.autograd.grad(loss, params, allow_unused=True)
        return params


def _backward_targets(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the check's backward differentiates for. What it must do is run every
    backward node once (that is where a tensor overwritten in place is detected), not compute
    every weight gradient: the biases and norm scales (1-D) plus the first parameter (the stem)
    put every node between them and the loss on the engine's path, and the engine then skips
    the weight-gradient kernels of every conv and linear — about half a backward's cost."""
    params = [p for p in model.parameters() if p.requires_grad]
    small = [p for p in params if p.ndim <= 1]
    if not small:
        return params
    return small if params[0].ndim <= 1 else [params[0], *small]


class TrainingStepError(VerifyError):
    """A training step (forward and backward) of the rewritten model failed."""


def training_step_error(model: nn.Module, call: TrainingCall | Any) -> str | None:
    """Why one training step of ``model`` as it is fails (None: it works). Leaves no trace.
    ``apply`` asks it of the original when the rewritten model's step failed: a model that
    cannot train as written (an in-place op on a value its own backward needs) is not a
    rewrite's fault."""
    try:
        with _checking_only(model, []):
            _training_step(model, as_training_call(call))
    except RuntimeError as exc:
        return _first_line(exc)
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def check_live(
    model: nn.Module,
    call: TrainingCall | Any,
    modules: dict[str, str],
    *,
    backward: bool = True,
    paths: Sequence[Path] = (),
) -> None:
    """What training does must work on the rewritten model: a training-mode forward **and
    backward** — ``call``, a :class:`~retrofit.verify.training_call.TrainingCall` (arguments and
    loss), or an input, as ``example_input`` (its loss: ``default_loss``) — under each of
    ``paths`` in turn (:data:`Path`: the techniques' forced passes; stochastic depth's first
    forces every batch-mode gate onto its kept path and lets the per-row ones draw both, its
    second forces the dropped path). The first pass (or the only one, without ``paths``) must
    call every module named in ``modules`` (name → what it is, for the message): the inserted
    layers and the reused drop-path slots. A rewrite
    that cannot train (a dropped branch hands back a shortcut that the model then overwrites in
    place, which autograd still needs) fails there instead of in the user's first step.

    With ``backward=False`` only the forwards run (the model cannot train as written).

    Raises VerifyError naming each module that was never called and its site, or
    TrainingStepError naming the pass whose forward or backward failed. Nothing the check does
    persists (see :func:`_checking_only`).
    """
    call = as_training_call(call)
    calls = dict.fromkeys(modules, 0)
    handles = []
    layers = []
    for name in modules:
        module = model.get_submodule(name)
        layers.append(module)

        def count(*_: Any, name: str = name) -> None:
            calls[name] += 1

        handles.append(module.register_forward_pre_hook(count))
    passes = list(paths) or [("", (), nullcontext)]
    layers += [m for _, forced, _ in passes for m in forced if m not in layers]
    params = None  # the first step's backward targets, for the next steps
    try:
        with _checking_only(model, layers):
            for i, (label, _, forcing) in enumerate(passes):
                keep = i == 0  # the liveness count is the first pass's
                with forcing():
                    try:
                        if backward:
                            params = _training_step(model, call, params)
                        else:
                            with torch.no_grad():
                                call.run(model)
                    except RuntimeError as exc:
                        step = f"a training step with {label}" if label else "a training step"
                        raise TrainingStepError(
                            f"the rewritten model cannot train: {step} failed ({_first_line(exc)})"
                        ) from exc
                if keep:
                    for handle in handles:
                        handle.remove()
                    handles = []
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
