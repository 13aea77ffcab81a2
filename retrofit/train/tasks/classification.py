"""Classification: what the trainer did before it knew other tasks, behind the task interface.

A batch is ``(images (N,C,H,W), labels (N,))``; the loss is the recipe's label-smoothed
cross-entropy on :func:`retrofit.train.outputs.logits_of` of the forward; the evaluation pass is :func:`retrofit.train.loop.evaluate` (top-1, top-5, loss).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from retrofit.train.tasks.base import Task


class ClassificationTask(Task):
    name = "classification"
    metric = "val_top1"  # the headline metric of an epoch record (compare compares it)
    metric_label = "top-1 (%)"

    def build_data(self, spec: Any, model: nn.Module, cfg: Any, **kw: Any) -> Any:
        from retrofit.train.data import build_data

        return build_data(spec, model, cfg, **kw)

    def resize_head(self, model: nn.Module, num_classes: int) -> str | None:
        from retrofit.train.classifier import resize_classifier

        return resize_classifier(model, num_classes)

    def criterion(self, cfg: Any) -> nn.Module:
        return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    def loss(self, model: nn.Module, x: Any, y: Any, criterion: nn.Module) -> torch.Tensor:
        from retrofit.train.outputs import logits_of

        # logits_of: the one place a forward's result (HF ModelOutput, dict, tuple) is read.
        return criterion(logits_of(model(x)), y)

    def evaluate(self, model: nn.Module, batches: Any, env: Any, precision: Any, *, bar: Any = None,
                 num_classes: int | None = None) -> dict[str, float]:  # fmt: skip
        from retrofit.train.loop import evaluate

        return evaluate(model, batches, env, precision, bar=bar)

    def epoch_fields(self, ev: dict[str, Any], prefix: str = "val_") -> dict[str, Any]:
        return {
            f"{prefix}loss": ev["loss"],
            f"{prefix}top1": ev["top1"],
            f"{prefix}top5": ev["top5"],
        }
