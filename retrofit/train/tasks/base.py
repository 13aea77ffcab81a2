"""What every task offers the training loop, and the defaults for batches of one image tensor.

A task answers, for its kind of model and data: ``build_data`` (the spec → train/val batches),
``resize_head`` (the data's classes), ``to_device`` and ``map_images`` (a batch on the device, and
an input-side transform such as Cutout applied to its images), ``criterion`` / ``loss`` (the
batch → a scalar), ``evaluate`` (the validation pass → its metrics) and ``epoch_fields`` (what an
epoch record and the console carry). ``metric`` names the headline metric that ``compare``
compares. Classification and segmentation batches are ``(images (N, C, H, W), targets)``
tensors, handled here; detection's are a tensor of images and a list of target dicts, and it
overrides both methods. :func:`embedded_or_files` is the one way a task's ``--data`` is read:
the embedded digits canvases, or the task's file reader.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from retrofit.train.tasks.canvas import CanvasSpec, is_canvas_spec, parse_canvas_spec


class Task:
    name: str
    metric: str  # the headline metric of an epoch record (compare compares it)
    metric_label: str
    # Modules the task's evaluation imports, imported when the task is made: torchmetrics takes
    # seconds to import, which belongs to the run's setup, not to its first evaluation's clock.
    preload: tuple[str, ...] = ()

    def __init__(self) -> None:
        for module in self.preload:
            importlib.import_module(module)

    def to_device(self, x: Any, y: Any, device: torch.device, precision: Any) -> tuple[Any, Any]:
        x = x.to(device, non_blocking=True)
        if precision.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(device, non_blocking=True)

    def map_images(self, x: Any, fn: Any) -> Any:
        """``fn`` (Cutout) on the batch of images."""
        return fn(x)


def embedded_or_files(
    spec: Any,
    device: Any,
    embedded: Callable[..., Any],
    files: Callable[..., Any],
    *args: Any,
    **kw: Any,
) -> Any:
    """A task's data bundle: ``embedded(canvas spec, *args, **kw)`` when ``spec`` names the
    embedded digits canvases (None or ``digits[:…]``), else ``files(spec, *args, **kw)`` with
    ``pin_memory`` set for a CUDA run (the readers' DataLoaders copy from pinned host memory)."""
    if is_canvas_spec(spec):
        canvas: CanvasSpec = parse_canvas_spec(None if spec is None else str(spec))
        return embedded(canvas, *args, **kw)
    return files(spec, *args, pin_memory=torch.device(device or "cpu").type == "cuda", **kw)
