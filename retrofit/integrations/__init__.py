"""Retrofit inside the training loops people already run.

Each integration drives one :class:`retrofit.lifecycle.Lifecycle` (the one retrofit's own trainer
uses) from its framework's events:

1. **start** when training starts: ``retrofit.apply`` (sites found, eval output verified
   unchanged, the model restored if anything fails) and ``retrofit.lint``; once per run, on rank
   0, the plan's summary and the lint verdict go to the framework's log (``retrofit plan: …``,
   ``retrofit lint: …``);
2. **update the schedules** every optimizer step (``retrofit.schedule.update(model, t)``,
   t = step / total steps): DropBlock's keep_prob ramp, stochastic depth's warm-up;
3. **report** to the framework's logger, per log step (Lightning, HF) or per epoch (timm), the
   figures the CLI prints (``retrofit.schedule.summary``) under ``retrofit/…``:
   ``sd_survival`` (mean current survival), ``sd_kept`` (mean kept fraction of the gates over
   the window since the last report), ``sd_planned`` (the plan's mean survival), ``keep_prob``
   (mean DropBlock keep_prob); with ``per_block=True`` also every layer's own
   (``retrofit/layer1.0/kept_fraction`` …). Evaluation and end-of-run records get none of them:
   they are training statistics;
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
  (timm is a core dependency), and a third line for ``summary.csv``.
"""

from __future__ import annotations

import math

from torch import nn

__all__ = ["defines_forward", "is_rank_zero", "progress", "suggest_module", "target_module"]


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


def defines_forward(module: nn.Module, base: type) -> bool:
    """Whether ``module``'s class (or a class between it and ``base``) writes its own
    ``forward``, rather than inheriting ``base``'s (which for ``LightningModule`` is
    ``nn.Module``'s "missing forward")."""
    for cls in type(module).__mro__:
        if cls is base:
            return False
        if "forward" in cls.__dict__:
            return True
    return False


def suggest_module(root: nn.Module, owner: str) -> str:
    """The one-line error for a root with nothing to trace: which ``module=`` to pass."""
    children = [(name, sum(p.numel() for p in m.parameters())) for name, m in root.named_children()]
    if not children:
        return f"{owner}: {type(root).__name__} has no forward and no submodule to retrofit"
    best = max(children, key=lambda c: c[1])[0]
    names = ", ".join(name for name, _ in children)
    return (
        f"{owner}: {type(root).__name__} has no forward of its own to trace; pass the network "
        f"to retrofit as module={best!r} (its nn.Module attributes: {names})"
    )


def is_rank_zero() -> bool:
    """Rank 0 of a torch.distributed job, or a single process."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
