"""Checks of what ``retrofit.apply`` promises, reusable by tests and tools.

Issue 10's contract: a model comes back *instrumented* — eval output unchanged and every
regularizer it added, replaced or re-rated actually called in training (no silent no-op) — or
*refused* with a retrofit error and exactly as it came: same ``state_dict`` (keys and values),
same module tree (names and types), no instance ``forward`` that was not there before, same
plain attributes (rates), same output.

    snap = snapshot(model)
    retrofit.apply(model, recipe, example_input=x)
    touched = touched_modules(model, snap)          # added, replaced or re-rated
    assert not dead_modules(model, x, touched)      # each called in one training forward
    ...or, after a refusal:
    assert_unchanged(model, snap)

These helpers read the model through public PyTorch API only (``named_modules``, ``state_dict``,
forward hooks), so they judge any capture the same way.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from retrofit.layers import StochasticDepthGate

__all__ = [
    "Snapshot",
    "assert_instrumented",
    "assert_trains",
    "assert_unchanged",
    "call_counts",
    "dead_modules",
    "differences",
    "eval_output",
    "retrofit_errors",
    "snapshot",
    "touched_modules",
]

_PLAIN = (bool, int, float, str, type(None))


def retrofit_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a refusal may raise: ``TraceError``, ``VerifyError`` and ``RewriteError``
    (taken from ``retrofit`` when it exports it, else from ``retrofit.rewrite.execute``)."""
    import retrofit

    rewrite_error = getattr(retrofit, "RewriteError", None)
    if rewrite_error is None:
        from retrofit.rewrite.execute import RewriteError as rewrite_error
    return (retrofit.TraceError, retrofit.VerifyError, rewrite_error)


def _run(model: nn.Module, x: Any) -> Any:
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, tuple):
        return model(*x)
    return model(x)


def eval_output(model: nn.Module, x: Any) -> list[torch.Tensor]:
    """The model's eval-mode output on ``x``, flattened to its tensors (train flags restored)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            out = _run(model, x)
    finally:
        for m, flag in flags:
            m.training = flag
    if hasattr(out, "to_tuple"):  # a transformers ModelOutput
        out = out.to_tuple()
    leaves, _ = tree_flatten(out)
    return [t.detach().clone() for t in leaves if isinstance(t, torch.Tensor)]


def _attrs(module: nn.Module) -> dict[str, Any]:
    return {
        k: v
        for k, v in module.__dict__.items()
        if isinstance(v, _PLAIN) and k != "training" and not k.startswith("_")
    }


@dataclass
class Snapshot:
    """What a model was before apply: enough to tell whether anything changed."""

    state: dict[str, torch.Tensor]
    modules: dict[str, nn.Module]  # name → the module object
    tree: list[tuple[str, str]]  # (name, type qualname)
    forwards: set[str]  # modules with an instance ``forward`` in their __dict__
    attrs: dict[str, dict[str, Any]]  # plain attributes per module (rates: drop_prob, p)
    dict_keys: dict[str, set[str]]  # every __dict__ key per module
    output: list[torch.Tensor] | None = None


def snapshot(model: nn.Module, x: Any = None) -> Snapshot:
    """Record ``model`` (and its eval output on ``x``, if given)."""
    named = dict(model.named_modules())
    return Snapshot(
        state={k: v.detach().clone() for k, v in model.state_dict().items()},
        modules=named,
        tree=[(n, type(m).__qualname__) for n, m in named.items()],
        forwards={n for n, m in named.items() if "forward" in m.__dict__},
        attrs={n: _attrs(m) for n, m in named.items()},
        dict_keys={n: set(m.__dict__) for n, m in named.items()},
        output=None if x is None else eval_output(model, x),
    )


def differences(model: nn.Module, snap: Snapshot, x: Any = None) -> list[str]:
    """Every way ``model`` differs from ``snap`` (empty when it is exactly as it came)."""
    out: list[str] = []
    state = model.state_dict()
    if list(state) != list(snap.state):
        added = sorted(set(state) - set(snap.state))
        gone = sorted(set(snap.state) - set(state))
        out.append(f"state_dict keys differ: added {added[:5]}, removed {gone[:5]}")
    for key, value in snap.state.items():
        now = state.get(key)
        if now is not None and (now.shape != value.shape or not torch.equal(now, value)):
            out.append(f"state_dict[{key!r}] changed")
    named = dict(model.named_modules())
    tree = [(n, type(m).__qualname__) for n, m in named.items()]
    if tree != snap.tree:
        before, after = set(snap.tree), set(tree)
        out.append(
            f"module tree differs: added {sorted(after - before)[:5]}, "
            f"removed {sorted(before - after)[:5]}"
        )
    for name, module in named.items():
        if name in snap.modules and module is not snap.modules[name]:
            out.append(f"module {name or '<root>'} was replaced by another object")
    forwards = {n for n, m in named.items() if "forward" in m.__dict__}
    if forwards - snap.forwards:
        out.append(f"instance forward left on {sorted(forwards - snap.forwards)[:5]}")
    for name, module in named.items():
        if name in snap.attrs and _attrs(module) != snap.attrs[name]:
            out.append(f"attributes of {name or '<root>'} changed: {_attrs(module)}")
        if name in snap.dict_keys and set(module.__dict__) - snap.dict_keys[name]:
            extra = sorted(set(module.__dict__) - snap.dict_keys[name])
            out.append(f"{name or '<root>'}.__dict__ gained {extra}")
    if x is not None and snap.output is not None:
        now = eval_output(model, x)
        same = len(now) == len(snap.output) and all(
            a.shape == b.shape and torch.equal(a, b) for a, b in zip(now, snap.output, strict=True)
        )
        if not same:
            out.append("eval output differs from before")
    return out


def assert_unchanged(model: nn.Module, snap: Snapshot, x: Any = None) -> None:
    diffs = differences(model, snap, x)
    assert not diffs, "model not handed back as it came:\n  " + "\n  ".join(diffs)


def touched_modules(model: nn.Module, snap: Snapshot) -> list[str]:
    """Modules apply added, replaced (another object under the same name) or re-rated (a plain
    attribute such as ``drop_prob`` changed): each must run in training."""
    out = []
    for name, module in model.named_modules():
        if (
            name not in snap.modules
            or module is not snap.modules[name]
            or _attrs(module) != snap.attrs.get(name)
            and any(isinstance(v, float) for v in _attrs(module).values())
        ):
            out.append(name)
    # a module under an added or replaced one is part of it: its parent's call is what counts
    return [n for n in out if not any(n.startswith(p + ".") for p in out if p)]


def call_counts(model: nn.Module, x: Any, names: Iterable[str]) -> dict[str, int]:
    """How many times each named module is called in one *training-mode* forward on ``x``.

    Parameters are not updated (no backward) and buffers (BatchNorm running statistics) and
    training flags are restored afterwards, so the model is as before.
    """
    names = list(names)
    counts = dict.fromkeys(names, 0)
    handles = []
    for name in names:
        module = model.get_submodule(name)

        def hook(_m: nn.Module, _a: Any, _o: Any, name: str = name) -> None:
            counts[name] += 1

        handles.append(module.register_forward_hook(hook))
    flags = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    # Liveness asks whether a module is called, not what a draw decided: every stochastic-depth
    # branch is kept for the check (a dropped batch-mode branch, slot included, does not run).
    survivals = [(m, m.survival) for m in model.modules() if isinstance(m, StochasticDepthGate)]
    for m, _ in survivals:
        m.survival = 1.0
    model.train()
    try:
        with torch.no_grad():
            _run(model, x)
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags:
            m.training = flag
        for m, p in survivals:
            m.survival = p
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    return counts


def dead_modules(model: nn.Module, x: Any, names: Iterable[str]) -> list[str]:
    """The named modules that one training-mode forward on ``x`` never calls."""
    return [n for n, c in call_counts(model, x, names).items() if c == 0]


def assert_instrumented(
    model: nn.Module, snap: Snapshot, x_probe: Any, x_fresh: Any, *, expected: int | None = None
) -> list[str]:
    """After a successful apply: eval output on a fresh input unchanged (needs ``snap`` taken
    with ``x_fresh``), every touched module live; returns the touched modules."""
    assert snap.output is not None, "take the snapshot with the fresh input"
    now = eval_output(model, x_fresh)
    assert len(now) == len(snap.output)
    for a, b in zip(now, snap.output, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    touched = touched_modules(model, snap)
    assert touched, "apply returned but changed nothing"
    if expected is not None:
        assert len(touched) == expected, f"{len(touched)} modules touched: {touched}"
    dead = dead_modules(model, x_probe, touched)
    assert not dead, f"never called in training (silent no-op): {dead}"
    return touched


def assert_trains(model: nn.Module, x: Any) -> None:
    """A training step (forward, then backward from the sum of the float outputs) works with
    every stochastic-depth gate keeping its branch, and again with every gate dropping it
    (survival ~0). Parameters, ``.grad``, buffers, rates and training flags are as before."""
    gates = [m for m in model.modules() if isinstance(m, StochasticDepthGate)]
    saved = [(m, m.survival) for m in gates]
    flags = [(m, m.training) for m in model.modules()]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        for survival, path in ((1.0, "kept"), (1e-9, "dropped")):
            for m in gates:
                m.survival = survival
            model.train()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a DropBlock whose schedule was never set
                out = _run(model, x)
            leaves, _ = tree_flatten(out.to_tuple() if hasattr(out, "to_tuple") else out)
            loss = sum(t.float().sum() for t in leaves if isinstance(t, torch.Tensor))
            try:
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            except RuntimeError as e:
                raise AssertionError(f"backward fails with every branch {path}: {e}") from e
            assert any(g is not None for g in grads), f"no gradient with every branch {path}"
    finally:
        for m, p in saved:
            m.survival = p
        for m, flag in flags:
            m.training = flag
        model.load_state_dict(state)
