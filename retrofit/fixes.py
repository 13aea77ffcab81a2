"""BN recalibration (Li et al., CVPR 2019), the third fix for Dropout before BatchNorm.

Li, Chen, Hu & Yang, "Understanding the Disharmony between Dropout and Batch Normalization by
Variance Shift", CVPR 2019 (arXiv:1801.05134). A dropout that reaches a BatchNorm makes BN
accumulate a training-time variance that inference never sees. Two remedies are recipe sections
(``retrofit/techniques/uout.py``: replace each flagged dropout with Uout;
``retrofit/techniques/dropout_fix.py``: move it after the last BN). The third is here:
:func:`recalibrate_bn` — for a model already trained with the bug, re-estimate every BN's
running statistics with dropout off, so ``running_var`` is the variance inference really has.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from retrofit.analysis.dropout_bn import is_running_stat_norm

__all__ = ["recalibrate_bn", "run_batches"]


# --- recalibration ----------------------------------------------------------------------------


def _inputs(batch: Any) -> Any:
    """The model input of one batch: a tensor, or the first item of an ``(x, y)`` pair."""
    if isinstance(batch, list | tuple):
        if not batch:
            raise ValueError("an empty batch: expected a tensor or an (input, target) pair")
        return batch[0]
    return batch


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


def run_batches(model: nn.Module, batches: Iterable[Any], max_batches: int | None = None) -> int:
    """Forward each batch (no grad, moved to the model's device and dtype); returns the count."""
    device, dtype = _device_dtype(model)
    if device.type == "meta":
        raise ValueError("the model is on the meta device: running batches needs real weights")
    count = 0
    with torch.no_grad():
        for batch in batches:
            if max_batches is not None and count >= max_batches:
                break
            x = _inputs(batch)
            if isinstance(x, torch.Tensor):
                x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
            model(x)
            count += 1
    return count


def recalibrate_bn(
    model: nn.Module, batches: Iterable[Any], *, max_batches: int | None = None
) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics with dropout off; in place, returned.

    Li et al. 2019: a model trained with Dropout before BN keeps a ``running_var`` inflated by
    dropout, which inference (dropout off) never sees. Recalibration runs ``batches`` (tensors or
    ``(input, target)`` pairs; training data, no labels needed) with every running-stat norm in
    training mode and *every other module in eval* — so ``nn.Dropout`` is off, and so is
    ``F.dropout(x, p, self.training)``, which follows its owner's flag — and with
    ``momentum=None``, torch's cumulative average, so each batch counts equally.

    Weights are untouched; only ``running_mean``, ``running_var`` and ``num_batches_tracked``
    change. Training flags and momenta are restored afterwards.

    Args:
        model: the trained model (real weights, any device).
        batches: an iterable of input tensors or ``(input, target)`` pairs.
        max_batches: stop after this many batches (None: all).

    Raises:
        ValueError: no batch was given, or the model is on the meta device.
    """
    norms = [m for m in model.modules() if is_running_stat_norm(m)]
    flags = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in norms]
    # The old statistics come back if no batch arrives or a forward fails: nothing half-done.
    saved = [{k: v.detach().clone() for k, v in m.named_buffers(recurse=False)} for m in norms]
    count = 0
    try:
        for m, _ in flags:
            m.training = False  # flags directly: a model's train() override is not run
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.training = True
        count = run_batches(model, batches, max_batches)
    finally:
        for m, flag in flags:
            m.training = flag
        for m, momentum in momenta:
            m.momentum = momentum
        if count == 0:
            with torch.no_grad():
                for m, buffers in zip(norms, saved, strict=True):
                    for name, value in buffers.items():
                        getattr(m, name).copy_(value)
    if count == 0:
        raise ValueError("recalibrate_bn needs at least one batch, but `batches` was empty")
    return model
