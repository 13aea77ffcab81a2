"""Samplers whose order is a pure function of (seed, epoch, rank): the basis of exact resume.

A resumed run must see the same batches in the same order as an uninterrupted one. Order that
depends on a generator's running state would need that state saved mid-epoch; order that is a
function of ``(seed, epoch)`` only needs the epoch and how many samples were already consumed.
``torch.utils.data.DistributedSampler`` already seeds its permutation with ``seed + epoch``; the
subclass here adds ``set_start`` to skip what was consumed, and can tag each index with the epoch
so per-sample augmentation can be seeded from ``(seed, epoch, index)`` (see ``data.SeededDataset``),
which makes augmentation independent of worker count and of where the run was interrupted.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import DistributedSampler, Sampler


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that can start mid-epoch.

    Works without a process group when ``num_replicas``/``rank`` are given (1 and 0 in a single
    process), so single-process and torchrun runs share one code path.

    Args:
        dataset_len: number of samples.
        num_replicas: world size.
        rank: this process's rank.
        shuffle: permute each epoch (training) or keep order.
        seed: base seed; epoch ``e`` uses ``seed + e`` as torch's ``DistributedSampler`` does.
        tag_epoch: yield ``(epoch, index)`` pairs instead of indices, for ``SeededDataset``.
    """

    def __init__(
        self,
        dataset_len: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        tag_epoch: bool = False,
    ) -> None:
        # drop_last=True: every rank gets the same number of samples without padding duplicates,
        # which keeps per-rank step counts equal (DDP collectives need that).
        super().__init__(
            range(dataset_len),  # only len() is used
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=True,
        )
        self.start = 0
        self.tag_epoch = tag_epoch

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` samples of this rank's share of the current epoch."""
        self.start = start

    def __iter__(self) -> Iterator:
        indices = list(super().__iter__())[self.start :]
        if self.tag_epoch:
            return iter([(self.epoch, i) for i in indices])
        return iter(indices)

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(Sampler):
    """Evaluation order: rank ``r`` of ``w`` takes indices ``r, r+w, r+2w, …``, no padding.

    ``DistributedSampler`` pads with repeated samples so every rank has the same count; for
    accuracy that would count some images twice. Evaluation runs outside DDP's forward (no
    collective per batch), so uneven shards are fine; the counts are summed with all_reduce.
    """

    def __init__(self, dataset_len: int, *, num_replicas: int = 1, rank: int = 0) -> None:
        self.indices = list(range(rank, dataset_len, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
