"""Numerics and layout per device: autocast dtype, grad scaler, channels_last.

bf16 has fp32's exponent range, so it needs no loss scaling; fp16 does (small gradients underflow),
hence ``torch.amp.GradScaler`` only for fp16. On CPU the default is plain fp32: CPU autocast is
slower than fp32 on most CPUs and the trainer's CPU path exists to be correct and reproducible.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from retrofit.errors import RecipeError
from retrofit.finetune_config import TrainConfig


@dataclass
class Precision:
    """Resolved numerics: ``dtype`` for autocast (None = fp32), a scaler for fp16, memory format."""

    device_type: str
    dtype: torch.dtype | None
    channels_last: bool

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[self.dtype]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def make_scaler(self) -> torch.amp.GradScaler | None:
        if self.dtype is torch.float16:
            return torch.amp.GradScaler(self.device_type)
        return None


def resolve_precision(cfg: TrainConfig, device: torch.device) -> Precision:
    """Pick autocast dtype and memory format for ``device`` from ``cfg.amp``/``cfg.channels_last``.

    Raises:
        RecipeError: ``amp: fp16`` on a CPU (no fp16 training there).
    """
    cuda = device.type == "cuda"
    dtype: torch.dtype | None
    if cfg.amp == "off":
        dtype = None
    elif cfg.amp == "auto":
        dtype = (
            (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else None
        )
    elif cfg.amp == "bf16":
        dtype = torch.bfloat16
    else:  # fp16
        if not cuda:
            raise RecipeError(
                "train.amp", "fp16", "'auto', 'bf16' or 'off' on a CPU", "fp16 training needs CUDA"
            )
        dtype = torch.float16
    channels_last = cuda if cfg.channels_last == "auto" else bool(cfg.channels_last)
    return Precision(device_type=device.type, dtype=dtype, channels_last=channels_last)
