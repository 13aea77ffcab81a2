"""Segmentation data in the PASCAL VOC layout: image + mask folders and split lists.

::

    DIR/JPEGImages/<id>.jpg
    DIR/SegmentationClass/<id>.png         one class index per pixel (VOC's palette PNGs), 255 = ignore
    DIR/ImageSets/Segmentation/train.txt   one <id> per line (and val.txt)
    DIR/labels.txt                         optional: class names, one per line, background first

``DIR`` may also be a directory holding ``VOCdevkit/VOC2012`` (what torchvision's
``VOCSegmentation`` downloads). Without ``labels.txt`` the classes are VOC's 21.

Images and masks are read as ``tv_tensors.Image`` / ``tv_tensors.Mask`` and transformed together
by torchvision's transforms v2 (the mask follows every geometric step, resized with nearest
neighbours): training takes a random rescale (0.5–2×) of the ``img_size`` crop, a random crop
(padded with 255 where the image is smaller) and a horizontal flip; validation resizes the
shorter side to ``img_size`` and takes the centre crop.

Every listed entry is checked before training: image and mask exist, have the same size, and the
mask holds only class indices < the number of classes (or 255). A failure is a :class:`DataError`
naming the file and the entry of the split list.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from retrofit.train.data import DataBundle, DataError, LoaderBatches

DEFAULT_SIDE = 320
IGNORE = 255
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
_FORM = (
    "expected a VOC directory: JPEGImages/, SegmentationClass/ and "
    "ImageSets/Segmentation/train.txt + val.txt (or a directory holding VOCdevkit/VOC20xx)"
)


def voc_root(path: Path) -> Path:
    if (path / "JPEGImages").is_dir():
        return path
    for sub in sorted(path.glob("VOCdevkit/VOC*"), reverse=True):
        if (sub / "JPEGImages").is_dir():
            return sub
    if not path.exists():
        raise DataError(f"--data {str(path)!r}: no such directory; {_FORM}")
    raise DataError(f"--data {str(path)!r}: no JPEGImages/ folder; {_FORM}")


def read_split(root: Path, split: str) -> list[str]:
    lst = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not lst.is_file():
        raise DataError(f"--data {str(root)!r}: {lst.relative_to(root)} not found; {_FORM}")
    ids = [ln.strip() for ln in lst.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not ids:
        raise DataError(f"{lst}: lists no image")
    return ids


def class_names(root: Path) -> list[str]:
    labels = root / "labels.txt"
    if labels.is_file():
        names = [ln.strip() for ln in labels.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if len(names) < 2:
            raise DataError(f"{labels}: needs at least 2 classes (background first)")
        return names
    return list(VOC_CLASSES)


def check_entries(root: Path, split: str, ids: list[str], num_classes: int) -> None:
    """Image and mask of every entry: present, same size, class indices in range.

    Raises:
        DataError: naming the mask (or image) file and the entry of the split list.
    """
    from PIL import Image

    lst = f"ImageSets/Segmentation/{split}.txt"
    for line, name in enumerate(ids, 1):
        where = f"entry {name!r} (line {line} of {lst})"
        image, mask = (
            root / "JPEGImages" / f"{name}.jpg",
            root / "SegmentationClass" / f"{name}.png",
        )
        for f in (image, mask):
            if not f.is_file():
                raise DataError(f"{f}: not found, {where}")
        try:
            with Image.open(image) as im:
                isize = im.size
            with Image.open(mask) as m:
                msize = m.size
                values = np.unique(np.asarray(m))
        except OSError as e:
            raise DataError(f"{root}: {where}: cannot be read ({e})") from None
        if isize != msize:
            raise DataError(
                f"{mask}: mask is {msize[0]}×{msize[1]} but its image {image.name} is "
                f"{isize[0]}×{isize[1]}, {where}"
            )
        bad = values[(values >= num_classes) & (values != IGNORE)]
        if len(bad):
            raise DataError(
                f"{mask}: class id {int(bad[0])} is out of range, {where}: the data has "
                f"{num_classes} classes (0..{num_classes - 1}; {IGNORE} = ignore)"
            )


class VOCSegmentationFolder(Dataset):
    """``(image, mask)`` pairs of one split as tv_tensors, through a transforms v2 pipeline."""

    def __init__(self, root: Path, ids: list[str], transforms: Any) -> None:
        self.root, self.ids, self.transforms = root, ids, transforms

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as TF

        name = self.ids[i]
        with Image.open(self.root / "JPEGImages" / f"{name}.jpg") as im:
            image = TF.to_image(im.convert("RGB"))
        with Image.open(self.root / "SegmentationClass" / f"{name}.png") as m:
            mask = tv_tensors.Mask(torch.from_numpy(np.array(m, dtype=np.int64)))
        image, mask = self.transforms(image, mask)
        return image, mask.as_subclass(torch.Tensor)


def _transforms(side: int, mean: tuple, std: tuple, train: bool) -> Any:
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    to_float = v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)
    if train:
        steps = [
            v2.RandomResize(side // 2, side * 2),
            v2.RandomCrop(
                side, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE}
            ),
            v2.RandomHorizontalFlip(0.5),
        ]
    else:
        steps = [v2.Resize(side), v2.CenterCrop(side)]
    return v2.Compose([*steps, to_float, v2.Normalize(mean, std)])


def voc_bundle(spec: Any, cfg: Any, mean: tuple, std: tuple, *, rank: int, world_size: int,
               pin_memory: bool) -> DataBundle:  # fmt: skip
    from retrofit.finetune_config import resolve_workers

    root = voc_root(Path(str(spec)).expanduser())
    names = class_names(root)
    splits = {split: read_split(root, split) for split in ("train", "val")}
    for split, ids in splits.items():
        check_entries(root, split, ids, len(names))
    side = cfg.img_size or DEFAULT_SIDE
    train_ds = VOCSegmentationFolder(root, splits["train"], _transforms(side, mean, std, True))
    val_ds = VOCSegmentationFolder(root, splits["val"], _transforms(side, mean, std, False))
    workers = resolve_workers(cfg.workers, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    kw = dict(rank=rank, world_size=world_size, workers=workers, pin_memory=pin_memory)
    return DataBundle(
        train=LoaderBatches(train_ds, cfg.batch_size, train=True, seed=cfg.seed, **kw),
        val=LoaderBatches(val_ds, cfg.batch_size, train=False, **kw),
        num_classes=len(names),
        input_size=(3, side, side),
        class_names=names,
        mean=mean,
        std=std,
        source=f"VOC segmentation at {root} ({len(train_ds)} train / {len(val_ds)} val images, {side}px crops)",
        task="segmentation",
    )
