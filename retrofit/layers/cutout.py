"""Cutout: zero random squares of the input image.

DeVries, Taylor, "Improved Regularization of Convolutional Neural Networks with Cutout", 2017
(https://arxiv.org/abs/1708.04552). For every image and each of n_holes holes a centre
(cy, cx) is drawn uniformly over the pixels, and the square

    [cy − length//2, cy + length//2) × [cx − length//2, cx + length//2)

clipped to the image is set to 0 in every channel. Centres near the border give partial holes,
which the paper found important. These are exactly the semantics of the reference snippet the
project started from; note that for an odd ``length`` the hole side is length − 1.

:func:`cutout` does a whole batch on its device with one mask built from broadcast comparisons
(no loop over images); :class:`Cutout` is the per-image transform for a torchvision pipeline and
:class:`BatchCutout` the module a trainer applies to a batch on the accelerator. All three draw
from torch's RNG (not numpy's), so DataLoader workers get distinct streams.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import Tensor, nn

__all__ = ["BatchCutout", "Cutout", "cutout"]


def _check(n_holes: int, length: int) -> None:
    if isinstance(n_holes, bool) or not isinstance(n_holes, int) or n_holes < 0:
        raise ValueError(f"n_holes has to be an integer >= 0, but got {n_holes!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length has to be an integer >= 1, but got {length!r}")


def cutout(
    images: Tensor,
    n_holes: int,
    length: int,
    generator: torch.Generator | None = None,
    centres: Tensor | None = None,
) -> Tensor:
    """Cutout (DeVries & Taylor 2017) on a batch of images (N, C, H, W).

    Args:
        images: batch of images; dtype, device and memory format are kept.
        n_holes: holes per image, >= 0 (0 returns ``images`` unchanged).
        length: nominal side of a hole, >= 1 (the hole spans length//2 on each side).
        generator: optional RNG for the centres, on the images' device.
        centres: optional fixed centres, integer tensor (N, n_holes, 2) of (cy, cx).

    Returns:
        A new tensor with the holes set to 0 in all channels.
    """
    if isinstance(images, torch.fx.Proxy):  # imported by name: see stochastic_depth
        args = (images, n_holes, length, generator, centres)
        return images.tracer.create_proxy("call_function", _cutout, args, {})
    _check(n_holes, length)
    if images.ndim != 4:
        raise ValueError(
            f"cutout expects a batch (N, C, H, W), but got shape {tuple(images.shape)}"
        )
    if n_holes == 0:
        return images
    n, _, h, w = images.shape
    device = images.device
    if centres is None:
        cy = torch.randint(0, h, (n, n_holes, 1), device=device, generator=generator)
        cx = torch.randint(0, w, (n, n_holes, 1), device=device, generator=generator)
    else:
        if tuple(centres.shape) != (n, n_holes, 2):
            raise ValueError(
                f"centres must have shape (N, n_holes, 2) = {(n, n_holes, 2)}, "
                f"but got {tuple(centres.shape)}"
            )
        centres = centres.to(device=device, dtype=torch.long)
        cy, cx = centres[..., 0:1], centres[..., 1:2]
    half = length // 2
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
    # with a broadcast bool mask); the (N, 1, H, W) mask keeps channels_last layouts.
    return images * keep.unsqueeze(1).to(images.dtype)


torch.fx.wrap("cutout")
_cutout = cutout


class Cutout:
    """Per-image Cutout transform for torchvision pipelines: tensor (C, H, W) in, tensor out.

    Put it after ``ToTensor()``/``Normalize`` as in the paper's code. Identical to
    :func:`cutout` on a batch of one for the same centres.
    """

    def __init__(
        self, n_holes: int = 1, length: int = 16, generator: torch.Generator | None = None
    ) -> None:
        _check(n_holes, length)
        self.n_holes = n_holes
        self.length = length
        self.generator = generator

    def __call__(self, img: Tensor, centres: Tensor | None = None) -> Tensor:
        """``centres``: optional (n_holes, 2) integer tensor of (cy, cx), for tests."""
        if not isinstance(img, Tensor) or img.ndim != 3:
            shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
            raise TypeError(
                f"Cutout expects a (C, H, W) tensor (place it after ToTensor()), got {shape}"
            )
        batch_centres = None if centres is None else centres.unsqueeze(0)
        return cutout(img.unsqueeze(0), self.n_holes, self.length, self.generator, batch_centres)[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_holes={self.n_holes}, length={self.length})"


class BatchCutout(nn.Module):
    """Cutout on a whole batch on its device, active only in training mode."""

    def __init__(self, n_holes: int = 1, length: int = 16) -> None:
        super().__init__()
        _check(n_holes, length)
        self.n_holes = n_holes
        self.length = length

    def forward(self, images: Tensor) -> Tensor:
        if not self.training:
            return images
        return cutout(images, self.n_holes, self.length)

    def extra_repr(self) -> str:
        return f"n_holes={self.n_holes}, length={self.length}"
