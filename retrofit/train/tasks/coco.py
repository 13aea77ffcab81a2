"""Detection data in COCO's format, read with torchvision's ``CocoDetection`` (pycocotools)
wrapped for transforms v2 (``wrap_dataset_for_transforms_v2``: boxes as ``tv_tensors``).

Layout (COCO's own)::

    DIR/annotations/instances_train2017.json   DIR/train2017/*.jpg
    DIR/annotations/instances_val2017.json     DIR/val2017/*.jpg

or any suffix in place of ``2017`` (``instances_train.json`` with ``train/``). Categories are
mapped, in increasing id order, to labels 1..K (0 is the background), so a head of
``num_classes = K + 1`` is trained; crowd annotations (``iscrowd: 1``) are left out of training
targets, as torchvision's references do.

Every annotation file is checked before anything is trained or written: the fields COCO
requires, boxes of positive size inside their image (1 px of slack for rounding), category and
image ids that exist, image files that exist. A failure is a :class:`DataError` naming the file
and the entry (``annotations[12] (id 4031)``).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from retrofit.train.data import DataBundle, DataError, LoaderBatches

SLACK_PX = 1.0  # COCO's own files have boxes that overrun the image by rounding
_FORM = (
    "expected a COCO directory: annotations/instances_train*.json and instances_val*.json, with "
    "the images in train*/ and val*/ beside annotations/ (e.g. train2017/)"
)
_IMAGE_FIELDS = ("id", "file_name", "width", "height")
_ANN_FIELDS = ("id", "image_id", "category_id", "bbox")


def find_splits(root: Path) -> dict[str, tuple[Path, Path]]:
    """``{"train": (json, image dir), "val": (...)}`` under ``root``.

    Raises:
        DataError: no such directory, or either split missing.
    """
    if not root.is_dir():
        raise DataError(f"--data {str(root)!r}: no such directory; {_FORM}")
    found: dict[str, tuple[Path, Path]] = {}
    for split in ("train", "val"):
        for ann in sorted((root / "annotations").glob(f"instances_{split}*.json")):
            suffix = re.sub(rf"^instances_{split}", "", ann.stem)
            images = root / f"{split}{suffix}"
            if images.is_dir():
                found[split] = (ann, images)
                break
        if split not in found:
            raise DataError(f"--data {str(root)!r}: no {split} split found; {_FORM}")
    return found


def check_coco_file(path: Path, images: Path) -> list[int]:
    """Check one COCO annotation file; returns its category ids, sorted.

    Raises:
        DataError: naming ``path`` and the first bad entry.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: the top level is a {type(data).__name__}, not a COCO object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            what = "missing" if key not in data else f"not a list ({type(data[key]).__name__})"
            raise DataError(
                f"{path}: field {key!r} is {what}; a COCO file has images, annotations and categories"
            )
    categories = []
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            raise DataError(f"{path}: categories[{i}]: missing or non-integer field 'id'")
        categories.append(int(cat["id"]))
    if not categories:
        raise DataError(f"{path}: 'categories' is empty: nothing to detect")
    sizes: dict[int, tuple[float, float]] = {}
    for i, im in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        if not isinstance(im, dict):
            raise DataError(f"{where}: not an object")
        for key in _IMAGE_FIELDS:
            if key not in im:
                raise DataError(f"{where} (id {im.get('id')}): missing field {key!r}")
        if not (
            _is_num(im["width"]) and _is_num(im["height"]) and im["width"] > 0 and im["height"] > 0
        ):
            raise DataError(
                f"{where} (id {im['id']}): width/height {im['width']}×{im['height']} are not positive numbers"
            )
        if not (images / str(im["file_name"])).is_file():
            raise DataError(
                f"{where} (id {im['id']}): file_name {im['file_name']!r} not found in {images}"
            )
        sizes[im["id"]] = (float(im["width"]), float(im["height"]))
    known = set(categories)
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}]"
        if not isinstance(ann, dict):
            raise DataError(f"{where}: not an object")
        where += f" (id {ann.get('id')})"
        for key in _ANN_FIELDS:
            if key not in ann:
                raise DataError(f"{where}: missing field {key!r}")
        if ann["image_id"] not in sizes:
            raise DataError(
                f"{where}: image_id {ann['image_id']!r} is not the id of an image in the file"
            )
        if ann["category_id"] not in known:
            raise DataError(
                f"{where}: category_id {ann['category_id']!r} is out of range: not one of the "
                f"file's categories ({_ids(categories)})"
            )
        _check_box(ann["bbox"], sizes[ann["image_id"]], f"{where}, image {ann['image_id']}")
    return sorted(categories)


def _check_box(bbox: Any, size: tuple[float, float], where: str) -> None:
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_num(v) for v in bbox)):
        raise DataError(f"{where}: bbox {bbox!r} is not [x, y, width, height] (4 numbers)")
    x, y, w, h = (float(v) for v in bbox)
    width, height = size
    if w <= 0 or h <= 0:
        raise DataError(f"{where}: bbox {bbox} has no area (width {w:g}, height {h:g})")
    if x < -SLACK_PX or y < -SLACK_PX or x + w > width + SLACK_PX or y + h > height + SLACK_PX:
        raise DataError(
            f"{where}: bbox {bbox} (x, y, width, height) lies outside the {width:g}×{height:g} "
            f"image (x + width = {x + w:g}, y + height = {y + h:g})"
        )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _ids(ids: list[int]) -> str:
    return ", ".join(map(str, ids[:10])) + (", …" if len(ids) > 10 else "")


class _Targets:
    """First step of the transforms: labels mapped to 1..K, crowd boxes dropped (training), and
    only tensors kept (the detector's targets; ``image_id`` is not one)."""

    def __init__(self, categories: list[int], masks: bool, drop_crowd: bool) -> None:
        self.lut = {c: i + 1 for i, c in enumerate(categories)}
        self.masks, self.drop_crowd = masks, drop_crowd

    def __call__(self, image: Any, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        from torchvision import tv_tensors

        h, w = image.height, image.width
        boxes = target.get("boxes")
        if boxes is None:  # an image without annotations: a negative example
            boxes = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(h, w))
        labels = torch.tensor(
            [self.lut[int(c)] for c in target.get("labels", [])], dtype=torch.int64
        )
        keep = torch.ones(len(labels), dtype=torch.bool)
        if self.drop_crowd and "iscrowd" in target:
            keep = torch.as_tensor(target["iscrowd"]).reshape(-1) == 0
        out = {"boxes": boxes[keep] if len(boxes) else boxes, "labels": labels[keep]}
        if self.masks:
            masks = target.get("masks")
            if masks is None:
                masks = tv_tensors.Mask(torch.zeros(0, h, w, dtype=torch.uint8))
            out["masks"] = tv_tensors.Mask(masks[keep] if len(masks) else masks)
        out["boxes"] = tv_tensors.wrap(out["boxes"], like=boxes)
        return image, out


def _dataset(ann: Path, images: Path, categories: list[int], *, train: bool, masks: bool) -> Any:
    from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
    from torchvision.transforms import v2

    steps: list[Any] = [_Targets(categories, masks, drop_crowd=train)]
    if train:
        steps.append(v2.RandomHorizontalFlip(0.5))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if train:
        steps.append(v2.SanitizeBoundingBoxes())
    keys = {"boxes", "labels", "iscrowd"} | ({"masks"} if masks else set())
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its loading to stdout
        ds = CocoDetection(str(images), str(ann), transforms=v2.Compose(steps))
    return wrap_dataset_for_transforms_v2(ds, target_keys=keys)


def coco_bundle(
    spec: Any, cfg: Any, *, masks: bool, rank: int, world_size: int, pin_memory: bool
) -> DataBundle:
    import os

    from retrofit.finetune_config import resolve_workers
    from retrofit.train.tasks.batches import collate_lists

    root = Path(str(spec)).expanduser()
    splits = find_splits(root)
    cats = {split: check_coco_file(ann, images) for split, (ann, images) in splits.items()}
    if cats["train"] != cats["val"]:
        raise DataError(
            f"{splits['val'][0]}: categories ({_ids(cats['val'])}) differ from those of "
            f"{splits['train'][0]} ({_ids(cats['train'])}); both splits need the same categories"
        )
    categories = cats["train"]
    train_ds = _dataset(*splits["train"], categories, train=True, masks=masks)
    val_ds = _dataset(*splits["val"], categories, train=False, masks=masks)
    names = _category_names(splits["train"][0], categories)
    first = json.loads(splits["train"][0].read_text(encoding="utf-8"))["images"][0]
    workers = resolve_workers(cfg.workers, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    kw = dict(
        rank=rank,
        world_size=world_size,
        workers=workers,
        pin_memory=pin_memory,
        collate_fn=collate_lists,
    )
    return DataBundle(
        train=LoaderBatches(train_ds, cfg.batch_size, train=True, seed=cfg.seed, **kw),
        val=LoaderBatches(val_ds, cfg.batch_size, train=False, **kw),
        num_classes=len(categories) + 1,
        input_size=(3, int(first["height"]), int(first["width"])),
        class_names=["background", *names],
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        source=f"COCO at {root} ({len(train_ds)} train / {len(val_ds)} val images)",
        task="detection",
    )


def _category_names(path: Path, ids: list[int]) -> list[str]:
    data = json.loads(path.read_text(encoding="utf-8"))
    by_id = {c["id"]: str(c.get("name", c["id"])) for c in data["categories"]}
    return [by_id[i] for i in ids]
