"""The embedded detection and segmentation data: scikit-learn's digits placed on larger canvases.

No download: the same 1797 real 8×8 digits as the classification default
(:func:`retrofit.train.data.load_digits_arrays`), with the same stratified split (seed 0), so
validation canvases only hold digits no training canvas holds. Each canvas is ``side``×``side``
pixels of background with 1–3 digits pasted at random places without overlapping, each digit
upscaled (bilinear) to a random size between ``side/6`` and ``side/3``. What a canvas gives:

- detection: one box per digit, the tight box (x0, y0, x1, y1 in pixels, xyxy) of its ink
  (pixels above half intensity), label = digit + 1 (0 is the background, torchvision's
  convention for ``num_classes``);
- segmentation: a mask with 0 for background and digit + 1 on the digit's ink.

Canvases are a fixed function of ``(split, index)``: every run, seed and rank sees the same ones
(the data order still follows ``train.seed``). ``--data`` forms::

    digits                         side 64, 480 train / 60 val canvases
    digits:side=96:train=64:val=16 any of the three changed
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_SIDE = 64
DEFAULT_TRAIN = 480
DEFAULT_VAL = 60  # 1:8 of training: an evaluation pass stays a small part of an epoch
MAX_DIGITS = 3
INK = 0.5  # a digit's pixel is ink above half of the full intensity
_FORM = "'digits' or 'digits:side=S:train=N:val=M' (any option may be left out; S >= 32)"


@dataclass(frozen=True)
class CanvasSpec:
    side: int = DEFAULT_SIDE
    train: int = DEFAULT_TRAIN
    val: int = DEFAULT_VAL
    spec: str = field(default="digits", compare=False)

    def describe(self) -> str:
        return f"digits on {self.side}px canvases ({self.train} train / {self.val} val)"


def parse_canvas_spec(spec: str | None) -> CanvasSpec:
    """``"digits:side=96:train=64"`` → ``CanvasSpec(96, 64, 120)``.

    Raises:
        DataError: an unknown option or a value out of range.
    """
    from retrofit.train.data import DataError

    if spec is None or spec == "digits":
        return CanvasSpec()
    values = {"side": DEFAULT_SIDE, "train": DEFAULT_TRAIN, "val": DEFAULT_VAL}
    for part in spec.split(":")[1:]:
        key, sep, value = part.partition("=")
        if not sep or key not in values:
            raise DataError(f"--data {spec!r}: bad option {part!r}; expected {_FORM}")
        try:
            values[key] = int(value)
        except ValueError:
            values[key] = -1
        low = 32 if key == "side" else 1
        if values[key] < low:
            raise DataError(f"--data {spec!r}: {key}={value!r} is not an integer >= {low}")
    return CanvasSpec(values["side"], values["train"], values["val"], spec)


def is_canvas_spec(spec: object) -> bool:
    return spec is None or str(spec) == "digits" or str(spec).startswith("digits:")


@dataclass
class Canvases:
    """``images`` (N, 1, S, S) in [0, 1]; ``boxes[i]`` (k_i, 4) xyxy float; ``labels[i]`` (k_i,)
    int64 in 1..10; ``masks`` (N, S, S) int64 in 0..10."""

    images: torch.Tensor
    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]
    masks: torch.Tensor


def make_canvases(pixels: np.ndarray, digits: np.ndarray, n: int, side: int, seed: int) -> Canvases:
    """``n`` canvases from the digits ``pixels`` (k, 64) in 0..16 with labels ``digits`` (k,).

    Each canvas draws its digits from a permutation of the pool (cycled when ``n`` canvases need
    more digits than the pool has), so every digit of the split is used before any repeats.
    """
    rng = np.random.RandomState(seed)
    pool = torch.from_numpy(pixels.reshape(-1, 1, 8, 8) / 16.0).float()
    order = rng.permutation(len(pool))
    lo, hi = max(8, side // 6), max(9, side // 3)
    images = torch.zeros(n, 1, side, side)
    masks = torch.zeros(n, side, side, dtype=torch.int64)
    boxes, labels = [], []
    taken = 0
    for i in range(n):
        placed: list[tuple[int, int, int, int]] = []
        box_i, lab_i = [], []
        for _ in range(rng.randint(1, MAX_DIGITS + 1)):
            size = rng.randint(lo, hi + 1)
            spot = _free_spot(rng, side, size, placed)
            if spot is None:
                break
            j = order[taken % len(order)]
            taken += 1
            x0, y0 = spot
            digit = F.interpolate(pool[j : j + 1], size=(size, size), mode="bilinear",
                                  align_corners=False)[0, 0].clamp_(0, 1)  # fmt: skip
            ink = digit > INK
            if not bool(ink.any()):
                continue
            images[i, 0, y0 : y0 + size, x0 : x0 + size] = digit
            masks[i, y0 : y0 + size, x0 : x0 + size][ink] = int(digits[j]) + 1
            rows = torch.nonzero(ink.any(1)).flatten()
            cols = torch.nonzero(ink.any(0)).flatten()
            box_i.append([x0 + cols[0].item(), y0 + rows[0].item(),
                          x0 + cols[-1].item() + 1, y0 + rows[-1].item() + 1])  # fmt: skip
            lab_i.append(int(digits[j]) + 1)
            placed.append((x0, y0, size, size))
        boxes.append(torch.tensor(box_i, dtype=torch.float32).reshape(-1, 4))
        labels.append(torch.tensor(lab_i, dtype=torch.int64))
    return Canvases(images, boxes, labels, masks)


def _free_spot(
    rng: np.random.RandomState, side: int, size: int, placed: list[tuple[int, int, int, int]]
) -> tuple[int, int] | None:
    """A top-left corner where a ``size`` square overlaps no placed one (None after 20 tries)."""
    for _ in range(20):
        x, y = rng.randint(0, side - size + 1), rng.randint(0, side - size + 1)
        if all(x + size <= px or px + pw <= x or y + size <= py or py + ph <= y
               for px, py, pw, ph in placed):  # fmt: skip
            return x, y
    return None


def digit_splits(
    val_fraction: float,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``((train pixels, train labels), (val pixels, val labels))``: the classification split."""
    from retrofit.train.data import DIGITS_SPLIT_SEED, load_digits_arrays, stratified_split

    pixels, target = load_digits_arrays()
    tr, va = stratified_split(target, val_fraction, DIGITS_SPLIT_SEED)
    tr, va = tr.numpy(), va.numpy()
    return (pixels[tr], target[tr]), (pixels[va], target[va])


def canvas_sets(spec: CanvasSpec, val_fraction: float) -> tuple[Canvases, Canvases]:
    """The training and validation canvases of ``spec`` (fixed seeds: 1 and 2)."""
    (ptr, ltr), (pva, lva) = digit_splits(val_fraction)
    return (
        make_canvases(ptr, ltr, spec.train, spec.side, seed=1),
        make_canvases(pva, lva, spec.val, spec.side, seed=2),
    )


CLASS_NAMES = ["background"] + [str(d) for d in range(10)]
