"""The fine-tuning trainer: ``fit(model, recipe, data)`` after the model surgery.

Modules, one job each:

- (``retrofit.finetune_config``: the recipe's ``train:`` section, :class:`TrainConfig`, in the core
  so that a recipe loads without importing the trainer)
- ``data``         ``--data`` → train/val batches (embedded digits, synthetic, ImageFolder, CIFAR)
- ``sampler``      data order as a function of (seed, epoch, rank): the basis of exact resume
- ``classifier``   resize the head to the data's classes (timm ``reset_classifier`` / last Linear)
- ``prepare``      resize → plan → ``retrofit.apply`` → lint, and the run's preamble files
- ``precision``    autocast dtype, grad scaler, channels_last per device
- ``distributed``  torchrun: process group, DDP flags, SyncBatchNorm, collectives
- ``checkpoint``   atomic checkpoints, RNG state, safetensors export (reading: ``retrofit.weights``)
- ``rundir``       the run directory: checked early, locked while a run writes, stale temps removed
- ``metrics``      accuracy counts and ``metrics.jsonl``
- ``console``      what a run prints: plan and lint up front, a line per epoch, a summary
- ``plots``        curves, per-block kept fractions and the survival schedule as PNGs
- ``interrupt``    SIGINT/SIGTERM → save and stop after the current step
- ``outputs``      a forward's result (tensor, HF ModelOutput, dict, tuple) → the logits
- ``loop``         ``fit`` itself
"""

from retrofit.finetune_config import TrainConfig
from retrofit.train.data import DataBundle, DataError, build_data
from retrofit.train.loop import RunResult, evaluate, fit
from retrofit.train.metrics import read_metrics
from retrofit.train.prepare import LintFindingsError
from retrofit.weights import load_weights, read_weights

__all__ = [
    "DataBundle",
    "DataError",
    "LintFindingsError",
    "RunResult",
    "TrainConfig",
    "build_data",
    "evaluate",
    "fit",
    "load_weights",
    "read_metrics",
    "read_weights",
]
