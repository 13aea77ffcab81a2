"""Batches whose targets are not one tensor: a list of per-image target dicts (detection)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from retrofit.train.data import TensorBatches


class TargetListBatches(TensorBatches):
    """In-memory images (one tensor) with one target dict per image, cut in
    :class:`~retrofit.train.sampler.ResumableSampler` order like :class:`TensorBatches`.

    Yields ``(images (B, C, H, W), [target dict] * B)``; the targets stay on the CPU until the
    task moves them (they are small, and a list of tensors cannot be ``index_select``-ed)."""

    def __init__(
        self,
        images: torch.Tensor,
        targets: list[dict[str, torch.Tensor]],
        batch_size: int,
        **kw: Any,
    ) -> None:
        super().__init__(images, torch.arange(len(targets)), batch_size, **kw)
        self.targets = targets

    def eval_view(self, batch_size: int) -> TargetListBatches:
        """The same images and targets as evaluation batches: each once, in order."""
        view = TargetListBatches(self.images, self.targets, batch_size, train=False)
        return view

    def place(self, device: torch.device, max_bytes: int) -> TargetListBatches:
        """The images may move to the accelerator; the targets (and indices) stay on the CPU."""
        if device.type != "cpu" and self.images.element_size() * self.images.numel() <= max_bytes:
            self.images = self.images.to(device)
        return self

    def iter_epoch(self, epoch: int = 0, start_batch: int = 0) -> Iterator[tuple[Any, Any]]:
        for idx in self.batch_indices(epoch, start_batch):
            images = self.images.index_select(0, idx.to(self.images.device))
            yield images, [self.targets[j] for j in idx.tolist()]


def collate_lists(batch: list[tuple[Any, Any]]) -> tuple[list[Any], list[Any]]:
    """A DataLoader collate for images of different sizes: ``([images], [targets])``."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)
