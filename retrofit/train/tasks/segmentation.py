"""Semantic segmentation: images ``(N, C, H, W)`` and masks ``(N, H, W)`` of class indices, 255
where no class is given (VOC's border pixels).

- **Loss**: cross-entropy on the model's ``out`` plus 0.5 × cross-entropy on its ``aux`` output
  when it has one, ignoring 255 — torchvision's reference ``train.py`` for FCN / DeepLabV3 /
  LRASPP. A model that returns a tensor (a U-Net by hand) is scored on that tensor; logits of
  another resolution than the mask are upsampled (bilinear) to it first.
- **Metric**: mean IoU over the classes and pixel accuracy, from torchmetrics'
  ``MulticlassJaccardIndex`` / ``MulticlassAccuracy`` (``ignore_index=255``): the definitions
  of the VOC / Cityscapes benchmarks (per-class IoU from the confusion matrix accumulated over the
  whole split, then the mean), with their sum reduction across torchrun ranks built in. The
  mean counts only the classes present in the split's targets or predictions.
- **Head**: the 1×1 classifier convolutions (``classifier``, ``aux_classifier``; LRASPP's
  ``low_classifier`` / ``high_classifier``) are replaced when the class count differs, keeping
  the state_dict keys of ``Builder(num_classes=N)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from retrofit.train.tasks.base import Task, embedded_or_files
from retrofit.train.tasks.canvas import CLASS_NAMES, canvas_sets
from retrofit.train.tasks.voc import voc_bundle

IGNORE = 255
AUX_WEIGHT = 0.5  # torchvision's references/segmentation/train.py


class SegmentationTask(Task):
    name = "segmentation"
    metric = "val_miou"
    metric_label = "mIoU (%)"
    preload = ("torchmetrics",)

    def build_data(self, spec: Any, model: nn.Module, cfg: Any, *, rank: int = 0, world_size: int = 1,
                   device: Any = None) -> Any:  # fmt: skip
        from retrofit.train.data import model_data_config

        data_cfg = model_data_config(model)
        mean, std = tuple(data_cfg["mean"][:3]), tuple(data_cfg["std"][:3])
        return embedded_or_files(spec, device, _canvas_bundle, voc_bundle, cfg, mean, std,
                                 rank=rank, world_size=world_size)  # fmt: skip

    def resize_head(self, model: nn.Module, num_classes: int) -> str | None:
        return resize_segmentation_head(model, num_classes)

    def criterion(self, cfg: Any) -> None:
        return None

    def loss(self, model: nn.Module, x: Any, y: Any, criterion: Any) -> torch.Tensor:
        out = model(x)
        if isinstance(out, dict):
            loss = _ce(out["out"], y)
            if out.get("aux") is not None:
                loss = loss + AUX_WEIGHT * _ce(out["aux"], y)
            return loss
        return _ce(out, y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Any, env: Any, precision: Any, *, bar: Any = None,
                 num_classes: int | None = None) -> dict[str, float]:  # fmt: skip
        from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

        from retrofit.train import distributed as D

        was_training = model.training
        model.eval()
        iou = MulticlassJaccardIndex(num_classes, ignore_index=IGNORE, average="macro",
                                     sync_on_compute=False).to(env.device)  # fmt: skip
        acc = MulticlassAccuracy(num_classes, ignore_index=IGNORE, average="micro",
                                 sync_on_compute=False).to(env.device)  # fmt: skip
        sums = torch.zeros(2, device=env.device, dtype=torch.float64)  # loss sum, pixels
        for x, y in batches.iter_epoch():
            x, y = self.to_device(x, y, env.device, precision)
            with precision.autocast():
                out = model(x)
            logits = _logits(out, y).float()
            sums[0] += F.cross_entropy(logits, y, ignore_index=IGNORE, reduction="sum")
            sums[1] += (y != IGNORE).sum()
            pred = logits.argmax(1)
            iou.update(pred, y)
            acc.update(pred, y)
            if bar is not None:
                bar.update(1)
        model.train(was_training)
        # Both metrics are sums over a confusion matrix: summing it across ranks is exact.
        for m in (iou, acc):
            for name in m._defaults:
                D.all_reduce_sum(getattr(m, name), env)
        D.all_reduce_sum(sums, env)
        loss, pixels = sums.tolist()
        return {
            "loss": loss / max(pixels, 1.0),
            "miou": 100.0 * float(iou.compute()),
            "pixel_acc": 100.0 * float(acc.compute()),
        }

    def epoch_fields(self, ev: dict[str, Any], prefix: str = "val_") -> dict[str, Any]:
        return {f"{prefix}loss": ev["loss"], f"{prefix}miou": ev["miou"],
                f"{prefix}pixel_acc": ev["pixel_acc"]}  # fmt: skip


def _logits(out: Any, y: torch.Tensor) -> torch.Tensor:
    logits = out["out"] if isinstance(out, dict) else out
    if logits.shape[-2:] != y.shape[-2:]:
        logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
    return logits


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(_logits(logits, y), y, ignore_index=IGNORE)


def _canvas_bundle(
    spec: Any, cfg: Any, mean: tuple, std: tuple, *, rank: int, world_size: int
) -> Any:
    from retrofit.train.data import DataBundle, TensorBatches, _eval_batch

    train, val = canvas_sets(spec, cfg.val_fraction)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)

    def normalised(images: torch.Tensor) -> torch.Tensor:
        return ((images.expand(-1, 3, -1, -1) - m) / s).contiguous()

    val_batches = TensorBatches(normalised(val.images), val.masks, _eval_batch(cfg) // 4,
                                train=False, rank=rank, world_size=world_size)  # fmt: skip
    side = spec.side
    return DataBundle(
        train=TensorBatches(normalised(train.images), train.masks, cfg.batch_size, train=True,
                            seed=cfg.seed, rank=rank, world_size=world_size),
        val=val_batches,
        num_classes=len(CLASS_NAMES),
        input_size=(3, side, side),
        class_names=list(CLASS_NAMES),
        mean=mean,
        std=std,
        source=f"sklearn {spec.describe()}, masks",
        task="segmentation",
    )  # fmt: skip


# --- heads -----------------------------------------------------------------------------------

_HEADS = ("classifier", "aux_classifier")


def resize_segmentation_head(model: nn.Module, num_classes: int) -> str | None:
    """Replace the classifier convolutions (out_channels = the current class count) under the
    model's ``classifier`` / ``aux_classifier`` (torchvision), or the last Conv2d of any other
    model, with ``num_classes``-channel ones; in place. None when nothing had to change.

    Raises:
        ValueError: the model has no Conv2d to treat as the classifier.
    """
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(
            f"cannot resize the classifier of {type(model).__name__} to {num_classes} classes: "
            "it has no Conv2d; build the model with the data's number of classes"
        )
    current = convs[-1][1].out_channels
    if current == num_classes:
        return None
    chosen = [(n, m) for n, m in convs if m.out_channels == current and n.split(".")[0] in _HEADS]
    chosen = chosen or [convs[-1]]
    for name, old in chosen:
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding,
                        old.dilation, old.groups, bias=old.bias is not None)  # fmt: skip
        new = new.to(old.weight.device, old.weight.dtype)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, new)
    return ", ".join(n for n, _ in chosen)
