"""Training data: the embedded digits default, ``synthetic``, ImageFolder trees and local CIFAR.

``build_data(spec, model, cfg)`` turns the CLI's ``--data`` value into a :class:`DataBundle`:

==========================  ===================================================================
``None`` or ``"digits"``    scikit-learn's handwritten digits (1797 real 8×8 grey images, 10
                            classes, shipped with scikit-learn: no download). Stratified split,
                            ``val_fraction`` held out, with a fixed split seed (0) so runs with
                            different ``train.seed`` are scored on the same images. Images are
                            scaled to [0, 1], resized (bilinear) to the input side, repeated to
                            the model's channels and normalised with the model's mean/std. The
                            side is ``train.img_size`` if set, else 32 px — upsampling 8×8
                            digits further adds no information and 32 px keeps a CPU run to
                            seconds per epoch — unless the model only accepts its pretrained
                            size (ViTs), which is then used.
``"digits:OPTION:…"``       a part of the digits: ``classes=6-9`` (or ``0,2,4-6``) keeps those
                            classes, relabelled 0..k−1 in increasing order; ``per_class=N``
                            trains on N images per class, a fixed draw from the training split
                            (the same images for every ``train.seed``). The validation split is
                            unchanged (restricted to the classes). Transfer and small-data
                            studies: pretrain on ``digits:classes=0-5``, fine-tune on
                            ``digits:classes=6-9:per_class=10``.
``"synthetic"`` or          random normalised images with random labels, ``N`` training images
``"synthetic:N"``           (default 512) and ``N // 4`` validation ones, at the model's input
                            size; for smoke tests and throughput, not for accuracy.
a directory with            an ImageFolder tree (``train/`` and ``val/`` or ``validation/``, one
``train/`` and ``val/``     sub-folder per class) read with timm's ``create_transform`` for the
                            model's data config (``timm.data.resolve_data_config``).
a CIFAR directory           ``cifar-10-batches-py`` / ``cifar-100-python`` as torchvision writes
                            them (the directory itself or its parent); read with
                            ``download=False``, transformed like an ImageFolder.
==========================  ===================================================================

The small in-memory sets are served as tensors (no DataLoader, no workers: indexing a tensor is
faster than collating); file sets use a DataLoader with workers and, on CUDA, pinned memory.
Both follow :class:`~retrofit.train.sampler.ResumableSampler`, so their order is a function of
``(seed, epoch, rank)`` and a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from retrofit.finetune_config import TrainConfig, resolve_workers
from retrofit.train.sampler import ResumableSampler, ShardSampler

DIGITS_DEFAULT_SIDE = 32
DIGITS_SPLIT_SEED = 0
SYNTHETIC_DEFAULT_N = 512
DEVICE_RESIDENT_BYTES = 2 << 30  # in-memory sets up to 2 GiB live on the GPU during training
# Evaluation batches of the in-memory sets: no backward and no stored activations, so they can be
# much larger than a (small-data) training batch; per-call overhead then stops dominating eval.
EVAL_BATCH = 256


log = logging.getLogger("retrofit.train")


class DataError(ValueError):
    """The ``--data`` value does not name a dataset retrofit can read; the message says what would."""


Batch = tuple[torch.Tensor, torch.Tensor]


class TensorBatches:
    """Batches cut from in-memory tensors in :class:`ResumableSampler` order."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.images, self.labels = images, labels
        self.batch_size = batch_size
        self.train = train
        if train:
            self.sampler: Any = ResumableSampler(
                len(labels), num_replicas=world_size, rank=rank, shuffle=True, seed=seed
            )
        else:
            self.sampler = ShardSampler(len(labels), num_replicas=world_size, rank=rank)

    @property
    def num_batches(self) -> int:
        """Batches in one full epoch on this rank (training drops the last partial batch)."""
        n = self.sampler.num_samples if self.train else len(self.sampler)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def place(self, device: torch.device, max_bytes: int) -> TensorBatches:
        """Keep the set on ``device`` when it is an accelerator and the set fits in ``max_bytes``.

        Batches are then cut on the device: no host-to-device copy per step. (Pinning the host
        tensor would not help: ``index_select`` returns pageable memory, so every batch would be
        a synchronous copy.)
        """
        if device.type != "cpu" and self.images.element_size() * self.images.numel() <= max_bytes:
            self.images, self.labels = self.images.to(device), self.labels.to(device)
        return self

    def batch_indices(self, epoch: int = 0, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """The sample indices (a CPU tensor) of each batch of ``epoch``, skipping the first
        ``start_batch`` batches; training drops the last partial batch. Subclasses cut their
        own batches from these (detection's per-image target lists)."""
        if self.train:
            self.sampler.set_epoch(epoch)
            self.sampler.set_start(start_batch * self.batch_size)
        order = torch.as_tensor(list(iter(self.sampler)), dtype=torch.long)
        stop = len(order) - len(order) % self.batch_size if self.train else len(order)
        for i in range(0 if self.train else start_batch * self.batch_size, stop, self.batch_size):
            yield order[i : i + self.batch_size]

    def iter_epoch(self, epoch: int = 0, start_batch: int = 0) -> Iterator[Batch]:
        """Yield ``(images, labels)`` of ``epoch``, skipping the first ``start_batch`` batches."""
        for idx in self.batch_indices(epoch, start_batch):
            idx = idx.to(self.images.device)
            yield self.images.index_select(0, idx), self.labels.index_select(0, idx)


class SeededDataset(Dataset):
    """Seeds torch's and Python's RNGs from ``(seed, epoch, index)`` around each ``__getitem__``.

    Random augmentation then depends only on which sample of which epoch is loaded, not on the
    worker that loads it or on how many samples that worker loaded before, so a run resumed
    mid-epoch augments every later image exactly as the uninterrupted run did. The caller's RNG
    state is restored afterwards (with ``workers=0`` this runs in the training process).
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        digest = hashlib.blake2b(f"{self.seed}/{epoch}/{index}".encode(), digest_size=8).digest()
        s = int.from_bytes(digest, "little") & ((1 << 63) - 1)
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            random.seed(s)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)


class LoaderBatches:
    """Batches from a map-style dataset through a DataLoader in :class:`ResumableSampler` order."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
        pin_memory: bool = False,
        collate_fn: Any = None,
    ) -> None:
        n = len(dataset)  # type: ignore[arg-type]
        self.batch_size, self.train = batch_size, train
        if train:
            self.sampler: Any = ResumableSampler(
                n, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, tag_epoch=True
            )
            dataset = SeededDataset(dataset, seed)
        else:
            self.sampler = ShardSampler(n, num_replicas=world_size, rank=rank)
        self._n = n
        self.workers = workers
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            drop_last=train,
            num_workers=workers,
            pin_memory=pin_memory,
            persistent_workers=workers > 0,
            collate_fn=collate_fn,
            # A private generator: otherwise each new iterator draws its worker base seed from the
            # global RNG, and where that draw happens differs between a resumed and a whole run.
            generator=torch.Generator().manual_seed(seed),
        )

    @property
    def num_batches(self) -> int:
        if self.train:
            return self.sampler.num_samples // self.batch_size
        return -(-len(self.sampler) // self.batch_size)

    @property
    def num_samples(self) -> int:
        return self._n

    def iter_epoch(self, epoch: int = 0, start_batch: int = 0) -> Iterator[Batch]:
        if self.train:
            self.sampler.set_epoch(epoch)
            self.sampler.set_start(start_batch * self.batch_size)
            yield from self.loader
        else:
            for i, batch in enumerate(self.loader):
                if i >= start_batch:
                    yield batch


@dataclass
class DataBundle:
    """What the trainer needs to know about its data.

    Attributes:
        train: training batches (``iter_epoch(epoch, start_batch)``, ``num_batches``).
        val: validation batches, sharded across ranks without padding.
        num_classes: number of classes; the classifier is resized to it.
        input_size: ``(C, H, W)`` of one image as the model receives it.
        class_names: class labels in index order.
        mean, std: the normalisation applied (the model's, from its data config).
        source: a one-line description for logs and ``model.json``.
        task: what the data is for (``classification``, ``detection``, ``segmentation``:
            :mod:`retrofit.train.tasks`); detection and segmentation count the background in
            ``num_classes``.
    """

    train: TensorBatches | LoaderBatches
    val: TensorBatches | LoaderBatches
    num_classes: int
    input_size: tuple[int, int, int]
    class_names: list[str]
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    task: str = "classification"

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary for the run directory."""
        return {
            "source": self.source,
            "num_classes": self.num_classes,
            "input_size": list(self.input_size),
            "train_samples": self.train.num_samples,
            "val_samples": self.val.num_samples,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def train_eval(self) -> TensorBatches | LoaderBatches:
        """The training split as evaluation batches: every image once, in order, without the
        training augmentation (a file set is read with the validation transform). A train
        accuracy measured on these is comparable with the validation accuracy, so their
        difference is the generalization gap."""
        tr, va = self.train, self.val
        if hasattr(tr, "eval_view"):  # batches of another shape (detection's target lists)
            return tr.eval_view(max(tr.batch_size, EVAL_BATCH))
        if isinstance(tr, TensorBatches):
            return TensorBatches(tr.images, tr.labels, max(tr.batch_size, EVAL_BATCH), train=False)
        base = tr.loader.dataset
        base = base.dataset if isinstance(base, SeededDataset) else base
        view = copy.copy(base)  # shares the file list; only the transform differs
        if hasattr(view, "transform"):
            view.transform = getattr(va.loader.dataset, "transform", None)
        return LoaderBatches(
            view, tr.batch_size, train=False, workers=tr.loader.num_workers, pin_memory=False,
            collate_fn=tr.loader.collate_fn,
        )  # fmt: skip


def model_data_config(model: nn.Module, cfg: TrainConfig | None = None) -> dict[str, Any]:
    """timm's data config for ``model`` (input size, mean, std, interpolation, crop) with
    ``cfg.img_size`` applied. torchvision and user models get timm's ImageNet defaults."""
    from timm.data import resolve_data_config

    data_cfg = dict(resolve_data_config({}, model=model))
    if cfg is not None and cfg.img_size:
        data_cfg["input_size"] = (data_cfg["input_size"][0], cfg.img_size, cfg.img_size)
    return data_cfg


def build_data(
    spec: str | Path | None,
    model: nn.Module,
    cfg: TrainConfig | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device | None = None,
) -> DataBundle:
    """Resolve a ``--data`` value into train/val batches for ``model``.

    Args:
        spec: ``None`` (embedded digits), ``"synthetic"``/``"synthetic:N"``, an ImageFolder
            directory or a local CIFAR-10/100 directory (see the module docstring).
        model: the model to be trained; only its data config (size, mean, std) is read.
        cfg: the training config (batch size, seed, workers, img_size, val_fraction).
        rank, world_size: this process's place under torchrun; each rank gets its own shard.
        device: where training runs. On CUDA, in-memory sets up to ``DEVICE_RESIDENT_BYTES`` move
            to the GPU once, and file datasets load into pinned memory so copies can overlap.

    Raises:
        DataError: the spec names nothing readable; the message names the path and what was expected.
    """
    cfg = cfg or TrainConfig()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    pin_memory = dev.type == "cuda"
    kw = dict(rank=rank, world_size=world_size)
    if spec is None or str(spec) == "digits" or str(spec).startswith("digits:"):
        bundle = _digits(model, cfg, parse_digits_spec(None if spec is None else str(spec)), **kw)
    elif str(spec) == "synthetic" or str(spec).startswith("synthetic:"):
        bundle = _synthetic(str(spec), model, cfg, **kw)
    else:
        bundle = _from_path(Path(spec).expanduser(), model, cfg, pin_memory=pin_memory, **kw)
    for part in (bundle.train, bundle.val):
        if isinstance(part, TensorBatches):
            part.place(dev, DEVICE_RESIDENT_BYTES)
    return bundle


def steps_per_epoch(bundle: DataBundle, cfg: TrainConfig) -> int:
    """Optimizer steps in one epoch of ``bundle`` under ``cfg``.

    Raises:
        DataError: not even one step (batch_size·grad_accum above this rank's share of the data).
    """
    steps = bundle.train.num_batches // cfg.grad_accum
    if steps < 1:
        raise DataError(
            f"data {bundle.source!r}: {bundle.train.num_batches} batch(es) per rank per epoch, "
            f"fewer than grad_accum={cfg.grad_accum}; lower train.batch_size ({cfg.batch_size}) "
            "or grad_accum"
        )
    return steps


def _eval_batch(cfg: TrainConfig) -> int:
    return max(cfg.batch_size, EVAL_BATCH)


def _accepts_side(model: nn.Module, channels: int, side: int) -> bool:
    """Whether ``model`` runs on a ``side``×``side`` image (ViTs only take their trained size)."""
    was_training = model.training
    try:
        p = next(model.parameters(), None)
        x = torch.zeros(1, channels, side, side, device=p.device if p is not None else None)
        with torch.no_grad():
            model.eval()
            model(x)
        return True
    except Exception:
        return False
    finally:
        model.train(was_training)


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``(pixels (1797, 64) float64 in 0..16, labels (1797,) int64)``.

    Read straight from the CSV scikit-learn ships (what ``sklearn.datasets.load_digits`` does):
    importing ``sklearn.datasets`` pulls in scipy and costs seconds per process, per torchrun rank.
    """
    spec = importlib.util.find_spec("sklearn")
    for base in (spec.submodule_search_locations or []) if spec else []:
        csv = Path(base) / "datasets" / "data" / "digits.csv.gz"
        if csv.is_file():
            data = np.loadtxt(csv, delimiter=",")
            return data[:, :-1], data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # layout changed: take the slow, public road

    d = load_digits()
    return d.data.astype(np.float64), d.target.astype(np.int64)


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted train/val indices with ``val_fraction`` of every class held out (rounded, >= 1)."""
    rng = np.random.RandomState(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_val = min(max(1, int(round(val_fraction * len(idx)))), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.from_numpy(np.sort(np.concatenate(train))), torch.from_numpy(
        np.sort(np.concatenate(val))
    )


@dataclass(frozen=True)
class DigitsSubset:
    """Which part of the digits a ``digits:…`` spec asks for (None: all of it)."""

    classes: tuple[int, ...] | None = None
    per_class: int | None = None
    spec: str = field(default="digits", compare=False)  # as the user wrote it, for errors

    @property
    def whole(self) -> bool:
        return self.classes is None and self.per_class is None

    def describe(self) -> str:
        parts = []
        if self.classes is not None:
            parts.append("classes " + ",".join(map(str, self.classes)))
        if self.per_class is not None:
            parts.append(f"{self.per_class} train images/class")
        return ", ".join(parts)


_DIGITS_FORM = "'digits', or 'digits:classes=A-B:per_class=N' (either option may be left out)"


def parse_digits_spec(spec: str | None) -> DigitsSubset:
    """``"digits:classes=6-9:per_class=10"`` → ``DigitsSubset((6, 7, 8, 9), 10)``.

    Raises:
        DataError: an unknown option, a class outside 0..9, or a count that is not an integer >= 1.
    """
    if spec is None or spec == "digits":
        return DigitsSubset(spec="digits")
    options: dict[str, str] = {}
    for part in spec.split(":")[1:]:
        key, sep, value = part.partition("=")
        if not sep or key not in ("classes", "per_class") or not value:
            raise DataError(f"--data {spec!r}: bad option {part!r}; expected {_DIGITS_FORM}")
        if key in options:
            raise DataError(f"--data {spec!r}: option {key!r} is given twice")
        options[key] = value
    classes = None
    if "classes" in options:
        chosen: set[int] = set()
        for item in options["classes"].split(","):
            lo, dash, hi = item.partition("-")
            try:
                a, b = int(lo), int(hi if dash else lo)
            except ValueError:
                a = b = -1
            if not (0 <= a <= b <= 9):
                raise DataError(
                    f"--data {spec!r}: classes item {item!r} is not a digit 0-9 or a range A-B "
                    "of them (e.g. classes=6-9 or classes=0,2,4-6)"
                )
            chosen.update(range(a, b + 1))
        if len(chosen) < 2:
            raise DataError(f"--data {spec!r}: a classification task needs at least 2 classes")
        classes = tuple(sorted(chosen))
    per_class = None
    if "per_class" in options:
        try:
            per_class = int(options["per_class"])
        except ValueError:
            per_class = 0
        if per_class < 1:
            raise DataError(
                f"--data {spec!r}: per_class={options['per_class']!r} is not an integer >= 1"
            )
    return DigitsSubset(classes, per_class, spec)


def _digits_subset(
    target: np.ndarray, tr: torch.Tensor, va: torch.Tensor, subset: DigitsSubset
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, list[int]]:
    """Restrict the split to ``subset``: (train indices, val indices, remapped labels, classes)."""
    classes = list(subset.classes) if subset.classes is not None else list(range(10))
    keep = np.isin(target, classes)
    tr, va = tr[keep[tr.numpy()]], va[keep[va.numpy()]]
    if subset.per_class is not None:
        # A fixed draw (its own seed, not train.seed): every run of a study sees the same images.
        rng = np.random.RandomState(DIGITS_SPLIT_SEED)
        chosen = []
        for c in classes:
            idx = tr.numpy()[target[tr.numpy()] == c].copy()
            if len(idx) < subset.per_class:
                raise DataError(
                    f"--data {subset.spec!r}: per_class={subset.per_class} but class {c} has only "
                    f"{len(idx)} training images"
                )
            rng.shuffle(idx)
            chosen.append(idx[: subset.per_class])
        tr = torch.from_numpy(np.sort(np.concatenate(chosen)))
    relabel = np.full(10, -1, dtype=np.int64)
    relabel[classes] = np.arange(len(classes))
    return tr, va, relabel[target], classes


def _digits(
    model: nn.Module,
    cfg: TrainConfig,
    subset: DigitsSubset | None = None,
    *,
    rank: int,
    world_size: int,
) -> DataBundle:
    subset = subset or DigitsSubset()
    data_cfg = model_data_config(model, cfg)
    channels = int(data_cfg["input_size"][0])
    if cfg.img_size:
        side = cfg.img_size
    else:
        side = DIGITS_DEFAULT_SIDE
        if not _accepts_side(model, channels, side):
            side = int(data_cfg["input_size"][1])
    pixels, target = load_digits_arrays()
    images = torch.from_numpy(pixels.reshape(-1, 1, 8, 8) / 16.0).float()  # 0..16 → [0, 1]
    images = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)
    images = images.clamp_(0, 1).expand(-1, channels, -1, -1)
    mean = torch.tensor(data_cfg["mean"][:channels]).view(1, -1, 1, 1)
    std = torch.tensor(data_cfg["std"][:channels]).view(1, -1, 1, 1)
    images = ((images - mean) / std).contiguous()
    tr, va = stratified_split(target, cfg.val_fraction, DIGITS_SPLIT_SEED)
    classes = list(range(10))
    if not subset.whole:
        tr, va, target, classes = _digits_subset(target, tr, va, subset)
    labels = torch.from_numpy(target)
    what = "" if subset.whole else f"{subset.describe()}, "
    return DataBundle(
        train=TensorBatches(
            images[tr],
            labels[tr],
            cfg.batch_size,
            train=True,
            seed=cfg.seed,
            rank=rank,
            world_size=world_size,
        ),
        val=TensorBatches(
            images[va], labels[va], _eval_batch(cfg), train=False, rank=rank, world_size=world_size
        ),
        num_classes=len(classes),
        input_size=(channels, side, side),
        class_names=[str(i) for i in classes],
        mean=tuple(data_cfg["mean"][:channels]),
        std=tuple(data_cfg["std"][:channels]),
        source=f"sklearn digits ({what}{len(tr)} train / {len(va)} val, {side}px)",
    )


def _synthetic(
    spec: str, model: nn.Module, cfg: TrainConfig, *, rank: int, world_size: int
) -> DataBundle:
    n = SYNTHETIC_DEFAULT_N
    if ":" in spec:
        try:
            n = int(spec.split(":", 1)[1])
            if n < 1:
                raise ValueError
        except ValueError:
            raise DataError(
                f"--data {spec!r}: expected 'synthetic' or 'synthetic:N' with N a positive integer"
            ) from None
    from retrofit.train.classifier import num_classes_of

    num_classes = num_classes_of(model) or 10
    data_cfg = model_data_config(model, cfg)
    c, h, w = (int(v) for v in data_cfg["input_size"])
    g = torch.Generator().manual_seed(cfg.seed)
    n_val = max(1, n // 4)
    x = torch.randn(n + n_val, c, h, w, generator=g)
    y = torch.randint(0, num_classes, (n + n_val,), generator=g)
    return DataBundle(
        train=TensorBatches(
            x[:n],
            y[:n],
            cfg.batch_size,
            train=True,
            seed=cfg.seed,
            rank=rank,
            world_size=world_size,
        ),
        val=TensorBatches(
            x[n:], y[n:], _eval_batch(cfg), train=False, rank=rank, world_size=world_size
        ),
        num_classes=num_classes,
        input_size=(c, h, w),
        class_names=[str(i) for i in range(num_classes)],
        mean=tuple(data_cfg["mean"]),
        std=tuple(data_cfg["std"]),
        source=f"synthetic ({n} train / {n_val} val, {h}x{w}px)",
    )


_CIFAR_DIRS = {"cifar-10-batches-py": "CIFAR10", "cifar-100-python": "CIFAR100"}
_VAL_DIRS = ("val", "validation")
_EXPECTED = (
    "expected 'synthetic', 'synthetic:N', nothing or 'digits[:classes=A-B][:per_class=N]' (the "
    "embedded digits), an ImageFolder directory "
    "with train/ and val/ sub-folders of one folder per class, or a CIFAR-10/100 directory in "
    "torchvision's format (containing cifar-10-batches-py/ or cifar-100-python/)"
)


def _from_path(
    path: Path, model: nn.Module, cfg: TrainConfig, *, pin_memory: bool, rank: int, world_size: int
) -> DataBundle:
    if not path.exists():
        raise DataError(f"--data {str(path)!r}: no such file or directory; {_EXPECTED}")
    if not path.is_dir():
        raise DataError(f"--data {str(path)!r}: is a file, not a directory; {_EXPECTED}")
    data_cfg = model_data_config(model, cfg)
    cifar = _cifar_root(path)
    if cifar is not None:
        root, cls_name = cifar
        train_ds, val_ds, classes = _cifar(root, cls_name, data_cfg, path)
        source = f"{cls_name} at {root}"
    else:
        train_dir = path / "train"
        val_dir = next((path / v for v in _VAL_DIRS if (path / v).is_dir()), None)
        if not train_dir.is_dir() or val_dir is None:
            have = sorted(p.name for p in path.iterdir())[:10]
            raise DataError(
                f"--data {str(path)!r}: found {have or 'an empty directory'}, not train/ and val/; {_EXPECTED}"
            )
        train_ds, val_ds, classes = _image_folder(train_dir, val_dir, data_cfg)
        source = f"ImageFolder at {path}"
    workers = resolve_workers(cfg.workers, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if cfg.workers is not None and workers < cfg.workers:
        log.warning(
            "train.workers=%d is more than the CPUs this process may use; using %d",
            cfg.workers,
            workers,
        )
    loader_kw = dict(rank=rank, world_size=world_size, workers=workers, pin_memory=pin_memory)
    return DataBundle(
        train=LoaderBatches(train_ds, cfg.batch_size, train=True, seed=cfg.seed, **loader_kw),
        val=LoaderBatches(val_ds, cfg.batch_size, train=False, **loader_kw),
        num_classes=len(classes),
        input_size=tuple(int(v) for v in data_cfg["input_size"]),  # type: ignore[arg-type]
        class_names=list(classes),
        mean=tuple(data_cfg["mean"]),
        std=tuple(data_cfg["std"]),
        source=source,
    )


def _transforms(data_cfg: dict[str, Any]) -> tuple[Any, Any]:
    from timm.data import create_transform

    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    kw = {k: data_cfg[k] for k in keys if k in data_cfg}
    return create_transform(**kw, is_training=True), create_transform(**kw, is_training=False)


def _image_folder(
    train_dir: Path, val_dir: Path, data_cfg: dict[str, Any]
) -> tuple[Dataset, Dataset, Sequence[str]]:
    from torchvision.datasets import ImageFolder

    train_tf, val_tf = _transforms(data_cfg)
    try:
        train_ds = ImageFolder(str(train_dir), transform=train_tf)
        val_ds = ImageFolder(str(val_dir), transform=val_tf)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"--data {str(train_dir.parent)!r}: {e}; {_EXPECTED}") from None
    if train_ds.classes != val_ds.classes:
        only_train = sorted(set(train_ds.classes) - set(val_ds.classes))[:5]
        only_val = sorted(set(val_ds.classes) - set(train_ds.classes))[:5]
        raise DataError(
            f"--data {str(train_dir.parent)!r}: train/ and {val_dir.name}/ must hold the same class "
            f"folders; only in train: {only_train}, only in {val_dir.name}: {only_val}"
        )
    return train_ds, val_ds, train_ds.classes


def _cifar_root(path: Path) -> tuple[Path, str] | None:
    if path.name in _CIFAR_DIRS:
        return path.parent, _CIFAR_DIRS[path.name]
    for sub, cls_name in _CIFAR_DIRS.items():
        if (path / sub).is_dir():
            return path, cls_name
    return None


def _cifar(
    root: Path, cls_name: str, data_cfg: dict[str, Any], given: Path
) -> tuple[Dataset, Dataset, Sequence[str]]:
    import torchvision.datasets as tvd

    cls = getattr(tvd, cls_name)
    train_tf, val_tf = _transforms(data_cfg)
    try:
        train_ds = cls(str(root), train=True, transform=train_tf, download=False)
        val_ds = cls(str(root), train=False, transform=val_tf, download=False)
    except (RuntimeError, FileNotFoundError, OSError) as e:
        raise DataError(
            f"--data {str(given)!r}: {cls_name} files are missing or corrupted ({e}); expected the "
            "files torchvision's download writes (data_batch_1..5 and test_batch for CIFAR-10; "
            "train and test for CIFAR-100, plus meta)"
        ) from None
    return train_ds, val_ds, train_ds.classes
