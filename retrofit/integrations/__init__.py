"""Retrofit inside the training loops people already run.

Each integration does the same four things in its framework's own terms:

1. **apply** the recipe when training starts (``retrofit.apply``: sites found, eval output
   verified unchanged, the model restored if anything fails);
2. **update the schedules** every optimizer step (``retrofit.schedule.update(model, t)``,
   t = step / total steps): DropBlock's keep_prob ramp, stochastic depth's warm-up;
3. **log** the current survival, the kept fraction of the gates and DropBlock's keep_prob to the
   framework's logger (``retrofit.schedule.summary``), under ``retrofit/…``;
4. **strip** when training ends or fails (``retrofit.strip``), so what the user exports is the
   original architecture. Checkpoints written *during* training need nothing: inserted layers
   hold no parameters or buffers, so a retrofitted model's ``state_dict`` has exactly the
   original's keys and loads into the original class with ``strict=True``.

Modules (each imports its framework; install the extra):

* ``retrofit.integrations.lightning``: :class:`RetrofitCallback` for PyTorch Lightning
  (``pip install 'retrofit[lightning]'``);
* ``retrofit.integrations.hf``: :class:`RetrofitTrainerCallback` for the Hugging Face
  ``Trainer`` (needs ``transformers`` and ``accelerate``: ``pip install 'retrofit[hf]'``);
* ``retrofit.integrations.timm``: :func:`scheduled`, the two-line hook for timm's ``train.py``
  (timm is a core dependency).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

__all__ = ["logged", "progress", "reset_gate_stats", "target_module"]


def target_module(root: nn.Module, module: str | None) -> nn.Module:
    """The module to retrofit: ``root`` itself, or its submodule named ``module``.

    Raises:
        ValueError: naming the missing submodule and the top-level children that exist.
    """
    if not module:
        return root
    try:
        return root.get_submodule(module)
    except AttributeError:
        children = ", ".join(name for name, _ in root.named_children()) or "none"
        raise ValueError(
            f"module {module!r} is not a submodule of {type(root).__name__} "
            f"(its children: {children})"
        ) from None


def progress(step: int, total: float) -> float:
    """Training progress t = step / total, clamped to [0, 1] (a resumed or extended run may
    step past the planned total).

    Raises:
        ValueError: the total is unknown (infinite, 0): the schedules need the run's length.
    """
    if not math.isfinite(total) or total <= 0:
        raise ValueError(
            f"retrofit's schedules need the number of training steps, but the trainer reports "
            f"{total!r}; set max_steps or max_epochs"
        )
    return min(max(step / total, 0.0), 1.0)


def reset_gate_stats(model: nn.Module) -> None:
    """Start a new window for the kept-fraction counters of the gates and of the reused
    drop-path slots (after each log)."""
    from retrofit.schedule import reset_stats

    reset_stats(model)


def logged(model: nn.Module, prefix: str = "retrofit/") -> dict[str, Any]:
    """The scalars an integration logs: ``retrofit.schedule.summary`` under ``prefix``."""
    from retrofit.schedule import current_rates, summary

    return {prefix + k: v for k, v in summary(current_rates(model)).items()}
