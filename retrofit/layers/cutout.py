"""Cutout: zero random squares of the input image.

DeVries, Taylor, "Improved Regularization of Convolutional Neural Networks with Cutout", 2017
(https://arxiv.org/abs/1708.04552). For every image and each of n_holes holes a centre
(cy, cx) is drawn uniformly over the pixels, and the square

    [cy − length//2, cy + length//2) × [cx − length//2, cx + length//2)

clipped to the image is set to 0 in every channel. Centres near the border give partial holes,
which the paper found important. These are exactly the semantics of the reference snippet the
project started from; note that for an odd ``length`` the hole side is length − 1.

Options that MosaicML Composer's ``CutOut`` offers (their definitions, our code):

* ``length`` as a float in (0, 1]: a fraction of the image side, the hole side being
  ``int(length · min(H, W))`` pixels (Composer's rule); an int is pixels.
* ``uniform_sampling``: every pixel equally likely to be masked. With centres uniform over the
  pixels, a border pixel is covered by fewer centres than an interior one; here the centre is
  drawn uniformly from [−length//2, H + length//2) × [−length//2, W + length//2) — it may lie
  outside the image by up to half the length — so each pixel row (column) is covered by exactly
  2·(length//2) of the H + 2·(length//2) possible centre rows: P(masked) is the same for all.
* ``per_batch``: one set of hole positions for the whole batch (Composer cuts the same square
  from every image of a batch); default: independent positions per image, as in the paper.

:func:`cutout` does a whole batch on its device with one mask built from broadcast comparisons
(no loop over images); :class:`Cutout` is the per-image transform for a torchvision pipeline and
:class:`BatchCutout` the module a trainer applies to a batch on the accelerator. All three draw
from torch's RNG (not numpy's), so DataLoader workers get distinct streams.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

__all__ = ["BatchCutout", "Cutout", "cutout", "hole_length"]


def _check(n_holes: int, length: int | float) -> None:
    if isinstance(n_holes, bool) or not isinstance(n_holes, int) or n_holes < 0:
        raise ValueError(f"n_holes has to be an integer >= 0, but got {n_holes!r}")
    if isinstance(length, float):
        if not 0.0 < length <= 1.0:
            raise ValueError(
                f"length as a float is a fraction of the image side and has to be in (0, 1], "
                f"but got {length!r}"
            )
    elif isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(
            f"length has to be an integer >= 1 (pixels) or a float in (0, 1] (a fraction of the "
            f"image side), but got {length!r}"
        )


def hole_length(length: int | float, height: int, width: int) -> int:
    """The hole side in pixels: ``length`` itself if an int, else ``int(length · min(H, W))``.

    Raises:
        ValueError: a fractional length that gives a hole masking nothing (< 2 pixels).
    """
    if not isinstance(length, float):
        return length
    pixels = int(length * min(height, width))
    if pixels < 2:
        raise ValueError(
            f"cutout length {length} of a {height}×{width} image is {pixels} pixel(s): the hole "
            "would mask nothing; use a larger fraction or an integer length in pixels"
        )
    return pixels


def cutout(
    images: Tensor,
    n_holes: int,
    length: int | float,
    generator: torch.Generator | None = None,
    centres: Tensor | None = None,
    *,
    uniform_sampling: bool = False,
    per_batch: bool = False,
) -> Tensor:
    """Cutout (DeVries & Taylor 2017) on a batch of images (N, C, H, W).

    Args:
        images: batch of images; dtype, device and memory format are kept.
        n_holes: holes per image, >= 0 (0 returns ``images`` unchanged).
        length: nominal side of a hole: an int >= 1 in pixels, or a float in (0, 1], a fraction
            of the image's shorter side (:func:`hole_length`). The hole spans length//2 on each
            side of its centre.
        generator: optional RNG for the centres, on the images' device.
        centres: optional fixed centres, integer tensor (N, n_holes, 2) of (cy, cx), or
            (1, n_holes, 2) with ``per_batch``.
        uniform_sampling: draw centres from the image grown by length//2 on every side, so every
            pixel is equally likely to be masked (Composer's ``uniform_sampling``).
        per_batch: one set of holes for every image of the batch (Composer's behaviour).

    Returns:
        A new tensor with the holes set to 0 in all channels.
    """
    if isinstance(images, torch.fx.Proxy):  # imported by name: see stochastic_depth
        args = (images, n_holes, length, generator, centres)
        kwargs = {"uniform_sampling": uniform_sampling, "per_batch": per_batch}
        return images.tracer.create_proxy("call_function", _cutout, args, kwargs)
    _check(n_holes, length)
    if images.ndim != 4:
        raise ValueError(
            f"cutout expects a batch (N, C, H, W), but got shape {tuple(images.shape)}"
        )
    if n_holes == 0:
        return images
    n, _, h, w = images.shape
    half = hole_length(length, h, w) // 2
    device = images.device
    m = 1 if per_batch else n  # number of distinct masks
    if centres is None:
        # uniform_sampling: the centre may lie up to half a hole outside the image (module doc).
        pad = half if uniform_sampling else 0
        cy = torch.randint(-pad, h + pad, (m, n_holes, 1), device=device, generator=generator)
        cx = torch.randint(-pad, w + pad, (m, n_holes, 1), device=device, generator=generator)
    else:
        if tuple(centres.shape) != (m, n_holes, 2):
            raise ValueError(
                f"centres must have shape ({'1' if per_batch else 'N'}, n_holes, 2) = "
                f"{(m, n_holes, 2)}, but got {tuple(centres.shape)}"
            )
        centres = centres.to(device=device, dtype=torch.long)
        cy, cx = centres[..., 0:1], centres[..., 1:2]
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    # (N, K, H) and (N, K, W) interval tests; comparing against the unclipped bounds clips for
    # free, since rows/cols only span the image.
    in_rows = ((rows >= cy - half) & (rows < cy + half)).float()
    in_cols = ((cols >= cx - half) & (cols < cx + half)).float()
    # Number of holes covering each pixel is a batched outer product summed over the K holes,
    # sum_k in_rows[n, k, i] · in_cols[n, k, j]; keep = max(1 − that, 0). One small bmm is much
    # cheaper than materialising an (N, K, H, W) boolean and reducing it.
    ones = torch.ones((), device=device)
    keep = torch.baddbmm(ones, in_rows.transpose(1, 2), in_cols, alpha=-1).clamp_(min=0)
    # Multiply by the 0/1 mask like the reference (a float multiply is far faster than a select
    # with a broadcast bool mask); the (N or 1, 1, H, W) mask keeps channels_last layouts.
    return images * keep.unsqueeze(1).to(images.dtype)


torch.fx.wrap("cutout")
_cutout = cutout


class Cutout:
    """Per-image Cutout transform for torchvision pipelines: tensor (C, H, W) in, tensor out.

    Put it after ``ToTensor()``/``Normalize`` as in the paper's code. Identical to
    :func:`cutout` on a batch of one for the same centres.
    """

    def __init__(
        self,
        n_holes: int = 1,
        length: int | float = 16,
        generator: torch.Generator | None = None,
        uniform_sampling: bool = False,
    ) -> None:
        _check(n_holes, length)
        self.n_holes = n_holes
        self.length = length
        self.generator = generator
        self.uniform_sampling = uniform_sampling

    def __call__(self, img: Tensor, centres: Tensor | None = None) -> Tensor:
        """``centres``: optional (n_holes, 2) integer tensor of (cy, cx), for tests."""
        if not isinstance(img, Tensor) or img.ndim != 3:
            shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
            raise TypeError(
                f"Cutout expects a (C, H, W) tensor (place it after ToTensor()), got {shape}"
            )
        batch_centres = None if centres is None else centres.unsqueeze(0)
        return cutout(
            img.unsqueeze(0),
            self.n_holes,
            self.length,
            self.generator,
            batch_centres,
            uniform_sampling=self.uniform_sampling,
        )[0]

    def __repr__(self) -> str:
        extra = ", uniform_sampling=True" if self.uniform_sampling else ""
        return f"{type(self).__name__}(n_holes={self.n_holes}, length={self.length}{extra})"


class BatchCutout(nn.Module):
    """Cutout on a whole batch on its device, active only in training mode."""

    identity_in_eval = True  # see retrofit.layers.protocol.EvalIdentity

    def __init__(
        self,
        n_holes: int = 1,
        length: int | float = 16,
        uniform_sampling: bool = False,
        per_batch: bool = False,
    ) -> None:
        super().__init__()
        _check(n_holes, length)
        self.n_holes = n_holes
        self.length = length
        self.uniform_sampling = uniform_sampling
        self.per_batch = per_batch

    def forward(self, images: Tensor) -> Tensor:
        if not self.training:
            return images
        return cutout(
            images,
            self.n_holes,
            self.length,
            uniform_sampling=self.uniform_sampling,
            per_batch=self.per_batch,
        )

    kind = "cutout"

    def rates(self) -> dict[str, Any]:
        """Settings for logging (``retrofit.layers.protocol.Reporting``)."""
        return {
            "n_holes": self.n_holes,
            "length": self.length,
            "uniform_sampling": self.uniform_sampling,
            "per_batch": self.per_batch,
        }

    def extra_repr(self) -> str:
        return (
            f"n_holes={self.n_holes}, length={self.length}"
            + (", uniform_sampling=True" if self.uniform_sampling else "")
            + (", per_batch=True" if self.per_batch else "")
        )
