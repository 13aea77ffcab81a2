"""What a rewrite guarantees, checked: eval equivalence and liveness.

House rules: never hand back a model whose inference output silently differs from the original
(``apply`` records the original's eval output on a probe input before rewriting and compares
after: :func:`compare`), nor one whose inserted regularizers silently never run (a training step on
the probe, forward and backward, with every stochastic-depth gate forced onto its kept path must
call every inserted layer and every reused slot, and the same step with every gate dropped must
work too: :func:`check_live`).
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

from retrofit.capture.sandbox import mode
from retrofit.errors import VerifyError
from retrofit.layers.stochastic_depth import is_gate
from retrofit.verify.training_call import TrainingCall, as_training_call

__all__ = [
    "TrainingStepError",
    "check_live",
    "compare",
    "eval_output",
    "output_tensors",
    "forced_gates",
    "paper_gates_neutral",
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
def forced_gates(gates: list[nn.Module], keep: bool) -> Iterator[None]:
    """Every batch-mode stochastic-depth gate in ``gates`` takes its kept (``keep=True``) or
    dropped path on each training call, whatever its draw, through the gate's own ``forced``
    attribute (``retrofit.layers.stochastic_depth``: eager and compiled alike). Row- and
    subset-mode gates decide per row: at p_l = ½ on the kept
    pass one step takes both paths on a batch of two or more (the branch runs on every row in
    row mode, on at least one in subset mode, so whatever it calls is called); on the dropped
    pass they keep every row.
    """
    saved = [(g, g.survival, g.forced) for g in gates]
    try:
        for g in gates:
            if g.mode == "batch":
                g.forced = keep
            else:
                _set_survival(g, 0.5 if keep else 1.0)
        yield
    finally:
        for g, survival, forced in saved:
            g.forced = forced
            g.survival = survival


def _set_survival(gate: nn.Module, value: float) -> None:
    if isinstance(gate.survival, torch.Tensor):
        with torch.no_grad():
            gate.survival.fill_(value)
    else:
        gate.survival = value


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
                m.training = not isinstance(m, nn.modules.batchnorm._NormBase)
            yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for m, state in states:
            m.__dict__.update(state)
        for m, flag in flags:
            m.training = flag


def _training_step(model: nn.Module, call: TrainingCall) -> None:
    """One training forward and, when its loss depends on a trainable parameter, the backward
    (gradients returned by ``autograd.grad`` and dropped; see :func:`_backward_targets`)."""
    with torch.enable_grad():
        output = call.run(model)
        try:
            loss = call.loss_of(output)
        except TypeError:
            if call.loss is not None:
                raise
            return  # no floating output (the default loss says so): nothing to run backward on
        params = _backward_targets(model)
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad or not params:
            return
        torch.autograd.grad(loss, params, allow_unused=True)


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
) -> None:
    """What training does must work on the rewritten model: a training-mode forward **and
    backward** — ``call``, a :class:`~retrofit.verify.training_call.TrainingCall` (arguments and
    loss), or an input, as ``example_input`` (its loss: ``default_loss``) — with
    every batch-mode stochastic-depth gate forced onto its kept path and the per-row ones
    drawing both paths (:func:`forced_gates`), which must call every module named in
    ``modules`` (name → what it is, for the message): the inserted layers and the reused
    drop-path slots; then, if there are batch-mode gates, the same step with them forced onto
    their dropped path. A rewrite
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
    gates = [m for m in model.modules() if is_gate(m)]
    layers += [g for g in gates if g not in layers]
    try:
        with _checking_only(model, layers):
            # Kept first: it runs every branch, so gates nested in a branch are reached. Only
            # a batch-mode gate has a dropped path the kept pass does not take (and there the
            # dropped pass is cheap: no branch runs).
            dropped = any(g.mode == "batch" for g in gates)
            for keep in (True, False) if dropped else (True,):
                path = "kept" if keep else "dropped"
                with forced_gates(gates, keep):
                    try:
                        if backward:
                            _training_step(model, call)
                        else:
                            with torch.no_grad():
                                call.run(model)
                    except RuntimeError as exc:
                        raise TrainingStepError(
                            f"the rewritten model cannot train: a training step with every "
                            f"stochastic-depth branch {path} failed ({_first_line(exc)})"
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
