"""torchvision's detection API, as far as checking a rewrite needs to know it.

A torchvision detector (Faster/Mask/Keypoint R-CNN, RetinaNet, FCOS, SSD/SSDlite, and any model
built from their classes, e.g. a timm backbone inside ``FasterRCNN``) is recognised by what the
API itself requires of it: a ``GeneralizedRCNNTransform`` as ``model.transform``. Such a model

* takes a *list* of 3×H×W images, which the transform resizes to ``min_size`` and batches;
* in training needs ``targets`` (one dict per image: ``boxes`` (N, 4) x1y1x2y2 in pixels,
  ``labels`` (N,) int64 ≥ 1, ``masks`` (N, H, W) for Mask R-CNN, ``keypoints`` (N, K, 3) for
  Keypoint R-CNN) and returns a dict of losses — so a liveness check with images alone fails
  with "targets should not be none when in training mode";
* in eval returns one dict of ``boxes``/``scores``/``labels`` per image, after a score threshold
  that random weights rarely pass (Faster R-CNN keeps scores > 0.05 of 91 classes: softmax of
  near-equal logits is ~0.011), so comparing detections alone compares empty tensors.

:func:`probe_images`, :func:`minimal_targets`, :func:`verifying` and :func:`watched` answer
those four points; ``retrofit/training_call.py`` and ``retrofit/api.py`` use them. Nothing here
imports torchvision unless the model already did (``sys.modules``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = [
    "PLUMBING_REASON",
    "is_detector",
    "is_plumbing",
    "minimal_targets",
    "probe_images",
    "verifying",
    "watched",
]

# Probe images per call: two, so batching and per-sample draws (row mode) are exercised.
_PROBE_IMAGES = 2


def _detection_module() -> Any:
    return sys.modules.get("torchvision.models.detection")


def is_detector(model: nn.Module) -> bool:
    """True for a model following torchvision's detection API (its ``transform``)."""
    detection = _detection_module()
    if detection is None:
        return False
    transform_type = detection.transform.GeneralizedRCNNTransform
    return isinstance(getattr(model, "transform", None), transform_type)


def _probe_side(model: nn.Module) -> int:
    # The transform resizes every image so its short side is min_size (capped by max_size):
    # a probe at that side is what the model really computes on, at no resize cost.
    transform = model.transform
    sides = [int(s) for s in getattr(transform, "min_size", (224,))]
    side = min(sides) if sides else 224
    return max(min(side, int(getattr(transform, "max_size", side))), 32)


def probe_images(model: nn.Module, seed: int = 0) -> tuple[list[torch.Tensor]]:
    """The eval probe of a detector: ``([image, image],)`` — positional arguments, one list of
    random 3×S×S images in [0, 1] at the transform's ``min_size`` (seeded, global RNG untouched),
    in the model's dtype and on its device (meta for a model built there)."""
    device, dtype = torch.device("cpu"), torch.float32
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            device, dtype = tensor.device, tensor.dtype
            break
    side = _probe_side(model)
    if device.type == "meta":
        return ([torch.empty(3, side, side, device="meta", dtype=dtype)] * _PROBE_IMAGES,)
    generator = torch.Generator().manual_seed(seed)
    images = [
        torch.rand(3, side, side, generator=generator).to(device=device, dtype=dtype)
        for _ in range(_PROBE_IMAGES)
    ]
    return (images,)


def _num_keypoints(model: nn.Module) -> int:
    predictor = getattr(getattr(model, "roi_heads", None), "keypoint_predictor", None)
    count = getattr(predictor, "out_channels", None)
    if not isinstance(count, int):
        layer = getattr(predictor, "kps_score_lowres", None)
        count = getattr(layer, "out_channels", None)
    if not isinstance(count, int) or count < 1:
        raise ValueError(
            f"{type(model).__name__}: cannot tell the number of keypoints from "
            f"roi_heads.keypoint_predictor ({type(predictor).__name__}); pass your own training "
            "example: retrofit.apply(..., training_call=TrainingCall((images, targets)))"
        )
    return count


def minimal_targets(model: nn.Module, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """One target per image, the least a training forward accepts: one box over the image's
    centre half, label 1 (a foreground class in every torchvision detector: 0 is background,
    and every head has ≥ 2 classes), plus its mask (Mask R-CNN) or K visible keypoints inside
    it (Keypoint R-CNN). The RoI heads add ground-truth boxes to their proposals, so every head
    (box, mask, keypoint) gets a positive sample and runs."""
    heads = getattr(model, "roi_heads", None)
    masks = bool(heads is not None and heads.has_mask())
    keypoints = _num_keypoints(model) if heads is not None and heads.has_keypoint() else 0
    targets = []
    for image in images:
        h, w = int(image.shape[-2]), int(image.shape[-1])
        device = image.device
        x1, y1, x2, y2 = w / 4, h / 4, 3 * w / 4, 3 * h / 4
        target = {
            "boxes": torch.tensor([[x1, y1, x2, y2]], dtype=torch.float32, device=device),
            "labels": torch.ones(1, dtype=torch.int64, device=device),
        }
        if masks:
            mask = torch.zeros(1, h, w, dtype=torch.uint8, device=device)
            mask[:, int(y1) : int(y2), int(x1) : int(x2)] = 1
            target["masks"] = mask
        if keypoints:
            # Spread along the box diagonal, all visible (v = 2, the COCO convention).
            t = torch.linspace(0.1, 0.9, keypoints)
            points = torch.stack(
                [x1 + t * (x2 - x1), y1 + t * (y2 - y1), torch.full_like(t, 2.0)], dim=1
            )
            target["keypoints"] = points.unsqueeze(0).to(device)
        targets.append(target)
    return targets


def watched(model: nn.Module) -> tuple[str, ...]:
    """The submodules whose eval outputs verification compares besides the detections: the
    model's direct children but the transform (the backbone's feature maps, the RPN's proposals,
    the heads' logits and regressions), so equivalence holds on the tensors the rewrite can
    touch, not only on the thresholded, NMS-ed detections."""
    return tuple(name for name, _ in model.named_children() if name != "transform")


# Detections kept per image while verifying: enough to compare boxes, scores, masks and
# keypoints; Mask/Keypoint R-CNN run their heads (and paste masks) per kept detection, so the
# default 100 made verification of those two ~10× slower than of Faster R-CNN.
_VERIFY_DETECTIONS = 10


@contextmanager
def verifying(model: nn.Module) -> Iterator[None]:
    """Every ``score_thresh`` in the model set to 0 and ``detections_per_img`` to at most 10
    for the duration (restored after), so an eval forward on random weights returns its best
    boxes instead of none: the detections, scores, masks and keypoints compared are real
    numbers. Any other model is left alone."""
    saved = []
    for module in model.modules() if is_detector(model) else ():
        for attr, value in (("score_thresh", 0.0), ("detections_per_img", _VERIFY_DETECTIONS)):
            old = module.__dict__.get(attr)
            if isinstance(old, int | float) and not isinstance(old, bool):
                saved.append((module, attr, old))
                setattr(module, attr, type(old)(min(old, value)))
    try:
        yield
    finally:
        for module, attr, old in saved:
            setattr(module, attr, old)


# The detection API's bookkeeping modules: their own forward is box coding, anchor generation,
# proposal sampling, loss computation and NMS over Python lists (control flow on tensor data, so
# no fx trace reads it); their convolutions live in children (``head``, ``box_head``,
# ``mask_head``…), which are traced on their own. No residual add and no conv stage is in their
# own code, which is what a skipped forward could hide.
PLUMBING_REASON = (
    "torchvision detection plumbing (resize, anchors, box coding, sampling, NMS): "
    "no residual or conv stage in its own code; its children are read"
)


def _plumbing_types() -> tuple[type, ...]:
    detection = _detection_module()
    if detection is None:
        return ()
    types: list[type] = []
    for module, names in (
        ("generalized_rcnn", ("GeneralizedRCNN",)),
        ("transform", ("GeneralizedRCNNTransform",)),
        ("rpn", ("RegionProposalNetwork",)),
        ("roi_heads", ("RoIHeads",)),
        ("anchor_utils", ("AnchorGenerator", "DefaultBoxGenerator")),
        ("retinanet", ("RetinaNet",)),
        ("fcos", ("FCOS",)),
        ("ssd", ("SSD",)),
    ):
        owner = getattr(detection, module, None)
        for name in names:
            found = getattr(owner, name, None)
            if isinstance(found, type):
                types.append(found)
    return tuple(types)


def is_plumbing(module: nn.Module) -> bool:
    """True for the detection API's own bookkeeping modules (see :data:`PLUMBING_REASON`);
    their subclasses too, unless the subclass overrides ``forward`` (then it is user code)."""
    types = _plumbing_types()
    if not isinstance(module, types):
        return False
    forward = type(module).forward
    return any(forward is t.forward for t in types)
