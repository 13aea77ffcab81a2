"""What the trainer trains a model *for*: one :class:`Task` per kind of prediction.

The loop (:mod:`retrofit.train.loop`) is the same for every task: schedules, precision, DDP,
checkpoints, resume, metrics.jsonl, plots, strip. What differs is small and lives here, one module
per task:

=================  ==================================  =======================================
task               a batch, and its loss               the evaluation pass
=================  ==================================  =======================================
classification     images ``(N,C,H,W)``, labels        top-1/top-5 and cross-entropy
                   ``(N,)``; label-smoothed CE
detection          a list of images, a list of target  COCO mAP@[.5:.95] and AP50 (torchmetrics'
                   dicts (``boxes`` xyxy, ``labels``);  ``MeanAveragePrecision``)
                   the sum of the detector's losses
segmentation       images, masks ``(N,H,W)`` (255 =    mIoU and pixel accuracy (torchmetrics'
                   ignore); CE on ``out`` + 0.5 ·       ``MulticlassJaccardIndex``) and CE
                   CE on ``aux`` (torchvision's recipe)
=================  ==================================  =======================================

Each task also says how to resize the model's head to the data's classes, how to read ``--data``
for it (:mod:`retrofit.train.tasks.canvas` for the embedded digits, :mod:`.coco`, :mod:`.voc`),
and which epoch-record field is its headline metric (``compare`` compares it).
"""

from __future__ import annotations

from typing import Any

from torch import nn

TASKS = ("classification", "detection", "segmentation")


def get_task(name: str) -> Any:
    """The task object for ``name`` (one of :data:`TASKS`)."""
    if name == "classification":
        from retrofit.train.tasks.classification import ClassificationTask

        return ClassificationTask()
    if name == "detection":
        from retrofit.train.tasks.detection import DetectionTask

        return DetectionTask()
    if name == "segmentation":
        from retrofit.train.tasks.segmentation import SegmentationTask

        return SegmentationTask()
    raise ValueError(f"task {name!r}: allowed: {', '.join(TASKS)}")


def infer_task(model: nn.Module) -> tuple[str, str | None]:
    """``(task, why)`` from the model's class: torchvision's detection and segmentation families
    (and subclasses of them) are recognised by their base classes; anything else is a
    classifier. ``why`` is None for classification, else a phrase for the console."""
    import torchvision.models.detection as det
    import torchvision.models.segmentation as seg

    detectors = (
        det.generalized_rcnn.GeneralizedRCNN,
        det.RetinaNet,
        det.FCOS,
        det.ssd.SSD,
    )
    if isinstance(model, detectors):
        return "detection", f"{type(model).__name__} is a torchvision detector"
    segmenters = (
        seg.deeplabv3.DeepLabV3,
        seg.fcn.FCN,
        seg.lraspp.LRASPP,
    )
    if isinstance(model, segmenters):
        return "segmentation", f"{type(model).__name__} is a torchvision segmentation model"
    return "classification", None


def task_of_name(name: str) -> str | None:
    """The task a torchvision model *name* implies (``fasterrcnn_resnet50_fpn`` → detection),
    read from torchvision's registry without building anything; None when it does not say."""
    import torchvision

    bare = name.split(":", 1)[1] if name.lower().startswith(("tv:", "torchvision:")) else name
    if bare in torchvision.models.list_models(module=torchvision.models.detection):
        return "detection"
    if bare in torchvision.models.list_models(module=torchvision.models.segmentation):
        return "segmentation"
    return None


def resolve_task(task: str | None, model: nn.Module) -> tuple[str, str | None]:
    """The task a run trains: ``task`` when given (checked), else inferred from ``model``.

    Returns ``(task, note)``: ``note`` says how it was inferred, for the console (None when the
    caller named the task or the model is a plain classifier).

    Raises:
        DataError: an unknown task name.
    """
    from retrofit.train.data import DataError

    if task is not None:
        if task not in TASKS:
            raise DataError(f"task {task!r}: allowed: {', '.join(TASKS)}")
        return task, None
    inferred, why = infer_task(model)
    note = f"task: {inferred} (inferred: {why}; --task to choose)" if why else None
    return inferred, note
