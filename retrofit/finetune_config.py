"""The recipe's ``train:`` section: :class:`TrainConfig`, its defaults and its validation.

Field names follow timm's ``train.py`` flags (``epochs``, ``lr``, ``opt``, ``sched``, ``warmup_epochs``,
``min_lr``, ``smoothing`` is spelled ``label_smoothing`` as in ``torch.nn.CrossEntropyLoss``, …) so a timm
user can read a recipe without a glossary. Every value is checked here, once, so the trainer can
trust what it gets: a bad value raises :class:`retrofit.errors.RecipeError` naming ``train.<key>``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from retrofit.errors import RecipeError

# timm's schedulers that can be stepped per optimizer update. 'plateau' is left out on purpose: it
# needs a validation metric and steps per epoch, which breaks "the lr is a function of the step".
SCHEDULERS = ("cosine", "tanh", "step", "multistep", "poly", "wsd", "rsqrt", "constant", "none")
AMP_MODES = ("auto", "bf16", "fp16", "off")
# Integers end up in torch/numpy int64 (seeds in torch.manual_seed, counts in tensors).
INT64_MAX = 2**63 - 1
# More loader workers than this per process rarely feed a fine-tune faster; each one is a process.
MAX_AUTO_WORKERS = 8


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and schedulers set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def resolve_workers(workers: int | None, processes_per_node: int = 1) -> int:
    """Data-loader workers for one process: ``workers``, or (None) what the machine has, at most
    :data:`MAX_AUTO_WORKERS`; never more than this process's share of the CPUs (above the CPU
    count the workers only compete for cores, and PyTorch's DataLoader warns about it)."""
    share = available_cpus() // max(int(processes_per_node), 1)
    if workers is None:
        return min(share, MAX_AUTO_WORKERS)
    return min(workers, share)


def _optimizers() -> list[str]:
    try:
        from timm.optim import list_optimizers

        return list(list_optimizers())
    except Exception:  # pragma: no cover - very old timm: accept anything, timm will complain
        return []


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning hyper-parameters (the recipe's ``train:`` section).

    Attributes:
        epochs: passes over the training split.
        batch_size: images per optimizer micro-step *per process* (timm's convention under torchrun).
        lr: peak learning rate, reached after warmup.
        weight_decay: decoupled weight decay; timm skips biases and norm weights.
        opt: optimizer name for ``timm.optim.create_optimizer_v2`` (``adamw``, ``sgd``, ``lamb``, …).
        momentum: momentum for SGD-like optimizers (ignored by Adam-like ones).
        sched: lr schedule for ``timm.scheduler.create_scheduler_v2``, stepped every optimizer update.
        warmup_epochs: linear warmup length in epochs (may be fractional); None = a tenth of the
            run, at most one epoch (:attr:`resolved_warmup_epochs`), so a 1-epoch fine-tune still
            reaches its peak lr and decays.
        warmup_lr: lr at the first step of warmup.
        min_lr: lr floor at the end of the schedule.
        label_smoothing: ε of label smoothing in the cross-entropy loss.
        grad_accum: micro-batches per optimizer step (effective batch = batch_size·grad_accum·world).
        clip_grad: max global gradient norm, or None for no clipping.
        ema: keep an exponential moving average of the weights (timm ``ModelEmaV3``) and evaluate it.
        ema_decay: EMA decay per optimizer step.
        amp: mixed precision on CUDA: ``auto`` (bf16 where supported, else fp16 with a grad scaler),
            ``bf16``, ``fp16`` or ``off``. CPU runs are fp32 under ``auto``.
        channels_last: NHWC memory format; ``auto`` means on for CUDA, off for CPU.
        compile: wrap the training forward in ``torch.compile``.
        seed: seeds everything random in a run: the data order, a resized classifier, every random
            regularizer, and (``retrofit-cli --train``, which builds the model) the model's initial
            weights; a Python caller of ``fit`` builds the model, so seeds that itself.
        workers: data-loader worker processes for file datasets (in-memory data needs none);
            None = what the machine has (:func:`resolve_workers`), never above the CPU count.
        img_size: input side in pixels; None takes it from the model's pretrained config
            (the embedded digits data defaults to 32 px, see ``retrofit.train.data``).
        log_every: optimizer steps between ``metrics.jsonl`` step records.
        checkpoint_every: optimizer steps between checkpoints, 0 = only at epoch ends and on stop.
        tensorboard: also log to TensorBoard in ``<out>/tensorboard`` (needs the tensorboard package).
        sync_bn: convert BatchNorm to SyncBatchNorm under torchrun on CUDA.
        bn_momentum: set the momentum of every BatchNorm of the model before training (timm's
            ``--bn-momentum``); None keeps the model's own. torchvision's MobileNetV3 (and the
            LRASPP / DeepLabV3 models on it) use 0.01, an ImageNet-length setting: on a short run
            from random weights the running statistics lag the weights, and the eval-mode model
            (what is evaluated) predicts what the first batches looked like.
        val_fraction: share of the embedded digits data held out for validation (stratified).
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    opt: str = "adamw"
    momentum: float = 0.9
    sched: str = "cosine"
    warmup_epochs: float | None = None
    warmup_lr: float = 1e-5
    min_lr: float = 1e-6
    label_smoothing: float = 0.1
    grad_accum: int = 1
    clip_grad: float | None = None
    ema: bool = False
    ema_decay: float = 0.9998
    amp: str = "auto"
    channels_last: bool | str = "auto"
    compile: bool = False
    seed: int = 0
    workers: int | None = None
    img_size: int | None = None
    log_every: int = 10
    checkpoint_every: int = 0
    tensorboard: bool = False
    sync_bn: bool = False
    bn_momentum: float | None = None
    val_fraction: float = 0.2

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> TrainConfig:
        """Build a config from the recipe's ``train:`` mapping; missing keys take their defaults.

        Raises:
            RecipeError: on an unknown key (with a did-you-mean), a wrong type or an out-of-range value.
        """
        if d is None:
            d = {}
        if isinstance(d, TrainConfig):
            return d
        if not isinstance(d, dict):
            raise RecipeError(
                "train", d, "a mapping of training settings, e.g. {epochs: 10, lr: 1e-3}"
            )
        names = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f"did you mean '{close[0]}'?" if close else None
                raise RecipeError(f"train.{key}", d[key], "one of: " + ", ".join(names), hint)
        return cls(**{k: _coerce(k, v) for k, v in d.items()})

    def to_dict(self) -> dict[str, Any]:
        """The config as a plain JSON/YAML-ready dict (every field, defaults included)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @property
    def resolved_warmup_epochs(self) -> float:
        """``warmup_epochs``, or its default: min(1, epochs / 10)."""
        if self.warmup_epochs is not None:
            return float(self.warmup_epochs)
        return min(1.0, self.epochs / 10)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed, validated like :meth:`from_dict`."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})


def _coerce(key: str, value: Any) -> Any:
    # YAML reads "1e-3" (no dot) as a string; accept numeric strings for float fields so a recipe
    # written the natural way works, and let _validate reject anything else.
    if key in _FLOATS and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


_FLOATS = {
    "lr",
    "weight_decay",
    "momentum",
    "warmup_epochs",
    "warmup_lr",
    "min_lr",
    "label_smoothing",
    "clip_grad",
    "ema_decay",
    "val_fraction",
    "bn_momentum",
}


def _is_int(v: Any, low: int = 0) -> bool:
    """An int (not a bool) in [low, 2**63-1]."""
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= INT64_MAX


def _is_num(v: Any) -> bool:
    """A finite int or float (not a bool): inf and nan are never a valid setting."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:  # an int beyond float range
        return False


def _validate(c: TrainConfig) -> None:
    """Every train setting in range, in the order of the checks below (the first bad one is
    reported); then the settings that depend on each other."""
    _validate_numbers(c)
    _validate_choices(c)
    if c.warmup_epochs is not None and c.warmup_epochs >= c.epochs:
        raise RecipeError("train.warmup_epochs", c.warmup_epochs, f"a number < epochs ({c.epochs})")


def _needs(c: TrainConfig) -> Callable[..., None]:
    """``need(key, ok, allowed, hint=None)``: raise the RecipeError for ``train.<key>`` unless ok."""

    def need(key: str, ok: bool, allowed: str, hint: str | None = None) -> None:
        if not ok:
            raise RecipeError(f"train.{key}", getattr(c, key), allowed, hint)

    return need


def _validate_numbers(c: TrainConfig) -> None:
    need = _needs(c)
    for key in ("epochs", "batch_size", "grad_accum", "log_every"):
        need(key, _is_int(getattr(c, key), 1), "an integer in [1, 2**63-1]")
    for key in ("seed", "checkpoint_every"):
        need(key, _is_int(getattr(c, key), 0), "an integer in [0, 2**63-1]")
    need(
        "workers",
        c.workers is None or _is_int(c.workers, 0),
        "null (what the machine has) or an integer in [0, 2**63-1]",
    )
    need("lr", _is_num(c.lr) and c.lr > 0, "a finite number > 0")
    for key in ("warmup_lr", "min_lr", "weight_decay", "momentum"):
        v = getattr(c, key)
        need(key, _is_num(v) and v >= 0, "a finite number >= 0")
    need(
        "warmup_epochs",
        c.warmup_epochs is None or (_is_num(c.warmup_epochs) and c.warmup_epochs >= 0),
        "null (a tenth of the run, at most 1 epoch) or a finite number >= 0",
    )
    need(
        "label_smoothing",
        _is_num(c.label_smoothing) and 0 <= c.label_smoothing < 1,
        "a number in [0, 1)",
    )
    need(
        "ema_decay", _is_num(c.ema_decay) and 0 < c.ema_decay < 1, "a number in (0, 1), e.g. 0.9998"
    )
    need("val_fraction", _is_num(c.val_fraction) and 0 < c.val_fraction < 1, "a number in (0, 1)")
    need(
        "clip_grad",
        c.clip_grad is None or (_is_num(c.clip_grad) and c.clip_grad > 0),
        "null or a finite number > 0",
    )
    need(
        "bn_momentum",
        c.bn_momentum is None or (_is_num(c.bn_momentum) and 0 < c.bn_momentum <= 1),
        "null (the model's own) or a number in (0, 1], e.g. 0.1",
    )
    need(
        "img_size",
        c.img_size is None or _is_int(c.img_size, 8),
        "null or an integer in [8, 2**63-1]",
    )


def _validate_choices(c: TrainConfig) -> None:
    need = _needs(c)
    for key in ("ema", "compile", "sync_bn", "tensorboard"):
        need(key, isinstance(getattr(c, key), bool), "true or false")
    need(
        "channels_last",
        isinstance(c.channels_last, bool) or c.channels_last == "auto",
        "true, false or 'auto'",
    )
    need("amp", c.amp in AMP_MODES, "one of " + ", ".join(repr(a) for a in AMP_MODES))
    need(
        "sched",
        c.sched in SCHEDULERS,
        "one of " + ", ".join(SCHEDULERS),
        _did_you_mean(c.sched, SCHEDULERS),
    )
    opts = _optimizers()
    if opts:
        need(
            "opt",
            isinstance(c.opt, str) and c.opt.lower() in opts,
            "an optimizer known to timm.optim.create_optimizer_v2 (see timm.optim.list_optimizers())",
            _did_you_mean(c.opt, opts),
        )


def _did_you_mean(value: Any, choices: Any) -> str | None:
    close = difflib.get_close_matches(str(value), list(choices), n=1)
    return f"did you mean '{close[0]}'?" if close else None
