"""Eval-mode equivalence of a rewritten model and the original.

House rule: never hand back a model whose inference output silently differs from the original.
``apply`` records the original's eval output on a probe input before rewriting and compares after.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from retrofit.errors import VerifyError

__all__ = ["eval_output", "probe_input", "probe_size", "compare", "paper_gates_neutral"]


def probe_size(model: nn.Module) -> tuple[int, ...]:
    """Input size (C, H, W) the model expects (timm's config, a ViT's image size, else 224²)."""
    from retrofit.models import probe_input_size

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


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def eval_output(model: nn.Module, x: Any) -> list[torch.Tensor]:
    """The model's eval-mode output on ``x`` as a flat list of tensors (train flags restored)."""
    with _eval_mode(model), torch.no_grad():
        out = model(*x) if isinstance(x, tuple) else model(x)
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
