"""What every task offers the training loop, and the defaults for batches of one image tensor.

A task answers, for its kind of model and data: ``build_data`` (the spec → train/val batches),
``resize_head`` (the data's classes), ``to_device`` and ``map_images`` (a batch on the device, and
an input-side transform such as Cutout applied to its images), ``criterion`` / ``loss`` (the
batch → a scalar), ``evaluate`` (the validation pass → its metrics) and ``epoch_fields`` (what an
epoch record and the console carry). ``metric`` names the headline metric that ``compare``
compares. Classification and segmentation batches are ``(images (N, C, H, W), targets)``
tensors, handled here; detection's are a tensor of images and a list of target dicts, and it
overrides both methods.
"""

from __future__ import annotations

from typing import Any

import torch


class Task:
    name: str
    metric: str  # the headline metric of an epoch record (compare compares it)
    metric_label: str

    def to_device(self, x: Any, y: Any, device: torch.device, precision: Any) -> tuple[Any, Any]:
        x = x.to(device, non_blocking=True)
        if precision.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(device, non_blocking=True)

    def map_images(self, x: Any, fn: Any) -> Any:
        """``fn`` (Cutout) on the batch of images."""
        return fn(x)
