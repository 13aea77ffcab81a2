"""Detection: torchvision's detector API (a list of images and a list of target dicts in, the
losses out in training; boxes, scores and labels out in eval).

- **Loss**: the sum of the losses the detector returns (RPN objectness and box regression, ROI
  classification and box regression for R-CNNs; focal and box losses for RetinaNet/FCOS), as
  torchvision's reference ``train.py`` sums them.
- **Metric**: COCO mAP@[.5:.95] and AP50 from torchmetrics' ``MeanAveragePrecision`` with the
  ``faster_coco_eval`` backend: the COCO evaluation protocol itself (pycocotools' algorithm,
  reimplemented in C++ and several times faster), kept by a maintained library rather than
  re-derived here. Under torchrun every rank's predictions are gathered and scored once.
- **Classes**: ``num_classes`` counts the background (torchvision's convention: 91 for COCO), so
  data with K categories trains a ``num_classes = K + 1`` head, labels 1..K.
- **Head**: the classification layer alone is replaced when the class count differs (Faster /
  Mask R-CNN's predictors, RetinaNet's / FCOS's ``cls_logits``, SSD's per-level convs), so the
  state_dict keys stay those of ``Builder(num_classes=K + 1)`` and the stripped weights load
  into it with ``strict=True``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from retrofit.train.tasks.base import Task, embedded_or_files
from retrofit.train.tasks.canvas import CLASS_NAMES, canvas_sets
from retrofit.train.tasks.coco import coco_bundle

IMAGE_MEAN = (0.0, 0.0, 0.0)  # detectors normalise inside (GeneralizedRCNNTransform): feed [0, 1]
IMAGE_STD = (1.0, 1.0, 1.0)


class DetectionTask(Task):
    name = "detection"
    metric = "val_map"
    metric_label = "mAP@[.5:.95] (%)"
    preload = ("torchmetrics",)

    def build_data(self, spec: Any, model: nn.Module, cfg: Any, *, rank: int = 0, world_size: int = 1,
                   device: Any = None) -> Any:  # fmt: skip
        from retrofit.train.data import DataError

        if _is_keypoint(model):
            raise DataError(
                f"{type(model).__name__} needs keypoint targets: keypoint detection is not a task "
                "the trainer knows (detection: boxes and labels, and masks for Mask R-CNN)"
            )
        return embedded_or_files(spec, device, _canvas_bundle, coco_bundle, cfg,
                                 masks=needs_masks(model), rank=rank, world_size=world_size)  # fmt: skip

    def resize_head(self, model: nn.Module, num_classes: int) -> str | None:
        return resize_detector_head(model, num_classes)

    def to_device(self, x: Any, y: Any, device: torch.device, precision: Any) -> tuple[Any, Any]:
        if isinstance(x, torch.Tensor):
            x = x.to(device, non_blocking=True)
        else:
            x = [im.to(device, non_blocking=True) for im in x]
        y = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in y]
        return x, y

    def map_images(self, x: Any, fn: Any) -> Any:
        """Cutout on each image (a list holds images of different sizes)."""
        if isinstance(x, torch.Tensor):
            return fn(x)
        return [fn(im[None])[0] for im in x]

    def criterion(self, cfg: Any) -> None:
        return None  # the detector computes its own losses

    def loss(self, model: nn.Module, x: Any, y: Any, criterion: Any) -> torch.Tensor:
        losses = model(x, y)
        return sum(losses.values())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Any, env: Any, precision: Any, *, bar: Any = None,
                 num_classes: int | None = None) -> dict[str, float]:  # fmt: skip
        from torchmetrics.detection import MeanAveragePrecision

        from retrofit.train import distributed as D

        was_training = model.training
        model.eval()
        preds: list[dict[str, torch.Tensor]] = []
        targets: list[dict[str, torch.Tensor]] = []
        for x, y in batches.iter_epoch():
            x, _ = self.to_device(x, [], env.device, precision)
            with precision.autocast():
                out = model(x)
            preds += [{k: o[k].detach().float().cpu() if k != "labels" else o[k].cpu()
                       for k in ("boxes", "scores", "labels")} for o in out]  # fmt: skip
            targets += [{"boxes": t["boxes"].cpu(), "labels": t["labels"].cpu()} for t in y]
            if bar is not None:
                bar.update(1)
        model.train(was_training)
        # Every rank scores everything: the COCO protocol ranks detections over the whole set.
        parts = D.gather_objects((preds, targets), env)
        preds = [p for part, _ in parts for p in part]
        targets = [t for _, part in parts for t in part]
        metric = MeanAveragePrecision(
            box_format="xyxy", iou_type="bbox", backend="faster_coco_eval"
        )
        metric.update(preds, targets)
        with _quiet("faster_coco_eval"):  # its COCO summary table, at INFO, on every evaluation
            res = metric.compute()
        return {"map": 100.0 * _num(res["map"]), "map_50": 100.0 * _num(res["map_50"])}

    def epoch_fields(self, ev: dict[str, Any], prefix: str = "val_") -> dict[str, Any]:
        return {f"{prefix}map": ev["map"], f"{prefix}map_50": ev["map_50"]}


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _num(t: torch.Tensor) -> float:
    v = float(t)
    return 0.0 if v < 0 else v  # torchmetrics reports -1 where no ground truth exists


def needs_masks(model: nn.Module) -> bool:
    return getattr(getattr(model, "roi_heads", None), "mask_predictor", None) is not None


def _is_keypoint(model: nn.Module) -> bool:
    return getattr(getattr(model, "roi_heads", None), "keypoint_predictor", None) is not None


def _canvas_bundle(spec: Any, cfg: Any, *, masks: bool, rank: int, world_size: int) -> Any:
    from retrofit.train.data import DataBundle
    from retrofit.train.tasks.batches import TargetListBatches

    train, val = canvas_sets(spec, cfg.val_fraction)

    def targets(c: Any) -> list[dict[str, torch.Tensor]]:
        out = []
        for i, (boxes, labels) in enumerate(zip(c.boxes, c.labels, strict=True)):
            t = {"boxes": boxes, "labels": labels}
            if masks:
                t["masks"] = _instance_masks(c.masks[i], boxes, labels)
            out.append(t)
        return out

    def rgb(images: torch.Tensor) -> torch.Tensor:
        return images.expand(-1, 3, -1, -1).contiguous()

    side = spec.side
    return DataBundle(
        train=TargetListBatches(rgb(train.images), targets(train), cfg.batch_size, train=True,
                                seed=cfg.seed, rank=rank, world_size=world_size),
        val=TargetListBatches(rgb(val.images), targets(val), 2 * cfg.batch_size,
                              train=False, rank=rank, world_size=world_size),
        num_classes=len(CLASS_NAMES),
        input_size=(3, side, side),
        class_names=list(CLASS_NAMES),
        mean=IMAGE_MEAN,
        std=IMAGE_STD,
        source=f"sklearn {spec.describe()}, boxes",
        task="detection",
    )  # fmt: skip


def _instance_masks(mask: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One binary mask per box: the pixels of its label inside it (canvas digits never overlap)."""
    out = torch.zeros(len(boxes), *mask.shape, dtype=torch.uint8)
    for k, (box, label) in enumerate(zip(boxes.tolist(), labels.tolist(), strict=True)):
        x0, y0, x1, y1 = (int(v) for v in box)
        out[k, y0:y1, x0:x1] = (mask[y0:y1, x0:x1] == label).to(torch.uint8)
    return out


# --- heads -----------------------------------------------------------------------------------


def resize_detector_head(model: nn.Module, num_classes: int) -> str | None:
    """Give a torchvision detector a ``num_classes`` classification layer (background included);
    in place. Returns what was replaced, or None when it already had that many classes.

    Raises:
        ValueError: a detector whose head this does not know (the message says what to do).
    """
    import torchvision.models.detection as det

    if isinstance(model, det.generalized_rcnn.GeneralizedRCNN):
        return _rcnn_head(model, num_classes)
    if isinstance(model, (det.RetinaNet, det.FCOS)):
        head = model.head.classification_head
        if head.num_classes == num_classes:
            return None
        old = head.cls_logits
        new = nn.Conv2d(old.in_channels, head.num_anchors * num_classes, kernel_size=old.kernel_size,
                        stride=old.stride, padding=old.padding)  # fmt: skip
        # The heads' own initialisation: the focal-loss prior (Lin et al. 2017, section 4.1).
        nn.init.normal_(new.weight, std=0.01)
        nn.init.constant_(new.bias, -math.log((1 - 0.01) / 0.01))
        head.cls_logits = new.to(old.weight.device, old.weight.dtype)
        head.num_classes = num_classes
        return "head.classification_head.cls_logits"
    if isinstance(model, det.ssd.SSD):
        head = model.head.classification_head
        if head.num_columns == num_classes:
            return None
        for i, block in enumerate(head.module_list):
            # SSD: one Conv2d per feature level; SSDlite: a Sequential ending in one.
            conv = block if isinstance(block, nn.Conv2d) else block[-1]
            anchors = conv.out_channels // head.num_columns
            new = nn.Conv2d(conv.in_channels, anchors * num_classes, conv.kernel_size, conv.stride,
                            conv.padding).to(conv.weight.device, conv.weight.dtype)  # fmt: skip
            if isinstance(block, nn.Conv2d):
                head.module_list[i] = new
            else:
                block[-1] = new
        head.num_columns = num_classes
        return "head.classification_head.module_list"
    raise ValueError(
        f"cannot resize the classification head of {type(model).__name__} to {num_classes} "
        "classes (torchvision's Faster/Mask R-CNN, RetinaNet, FCOS and SSD are known); build the "
        "model with num_classes = the data's categories + 1 (--model-kwargs num_classes=N)"
    )


def _rcnn_head(model: nn.Module, num_classes: int) -> str | None:
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

    roi = model.roi_heads
    predictor = roi.box_predictor
    if predictor.cls_score.out_features == num_classes:
        return None
    dev, dtype = predictor.cls_score.weight.device, predictor.cls_score.weight.dtype
    roi.box_predictor = FastRCNNPredictor(predictor.cls_score.in_features, num_classes).to(
        dev, dtype
    )
    replaced = "roi_heads.box_predictor"
    if roi.mask_predictor is not None:
        old = roi.mask_predictor
        roi.mask_predictor = MaskRCNNPredictor(
            old.conv5_mask.in_channels, old.conv5_mask.out_channels, num_classes
        ).to(dev, dtype)
        replaced += ", roi_heads.mask_predictor"
    return replaced
