"""DropBlock: drop contiguous square regions of a convolutional feature map.

Ghiasi, Lin, Le, "DropBlock: A regularization method for convolutional networks", NeurIPS 2018
(https://arxiv.org/abs/1810.12890). Dropout on conv features removes single activations that
their neighbours still describe; DropBlock removes block_size × block_size regions instead.

Algorithm 1 of the paper, generalised from a square feat_size to H × W:

1. block seeds M ~ Bernoulli(γ), sampled only where a whole block fits, i.e. on the
   (H − bs + 1) × (W − bs + 1) valid region, with
   γ = (1 − keep_prob) / bs² · (H·W) / ((H − bs + 1)(W − bs + 1));
2. every seed grows into the bs × bs block it anchors (the paper's max-pool; here two small
   matmuls, see ``_cover``), block_mask = 1 − blocks;
3. A = A · block_mask · count(block_mask) / count_ones(block_mask).

Blocks overlap, so the dropped fraction is 1 − keep_prob only to first order in γ·bs²:
for keep_prob = 0.9, block_size = 7 on 64 × 64 it is ≈ 0.094; see ``expected_drop_fraction``.
keep_prob is ramped linearly from 1 to its target during training (Section 3, "Scheduled
DropBlock"); :class:`DropBlock` does this through ``set_progress``, driven by
``retrofit.schedule.update(model, t)``.

Why not reuse a library implementation: timm's ``drop_block_2d`` (this environment's timm has no
separate fast path any more) samples seeds on the whole map with the γ meant for the valid
region, so blocks at the border are clipped and the dropped fraction is not the paper's (measured
0.114 against 0.095 here for keep_prob 0.9, block_size 7 on 64 × 64);
``torchvision.ops.drop_block2d`` seeds the valid region like the paper but always draws a mask per
channel (pad + max-pool over N·C·H·W), rejects even block sizes and has no shared-mask option,
which makes it tens of times slower on a ResNet stage-3 map. This module seeds like the paper,
shares the mask across channels by default and keeps all mask work on an (N, 1, H, W) tensor, so
the only full-size operation is the final multiply (``tools/bench_layers.py`` measures it).

Peer options (timm's ``DropBlock2d``, torchvision's ``DropBlock3d``):

* ``gamma_scale`` multiplies γ (timm: 0.25 on ResNet stage 3, 1.0 on stage 4). The dropped
  fraction is then ≈ gamma_scale·(1 − keep_prob): keep_prob no longer is the kept fraction.
* ``scale=False`` leaves the kept activations unscaled (timm's ``scale_by_keep=False``).
* 5-D (N, C, T, H, W) maps of video CNNs (torchvision's ``r3d_18``, ``mc3_18``,
  ``r2plus1d_18``; torchvision's ``drop_block3d``): seeds on the (T − bt + 1)(H − bh + 1)(W − bw
  + 1) valid region, blocks of bt × bh × bw, each side the block size clamped to its dimension
  (a late-stage clip has T = 2 or 4 frames, far fewer than 7), and
  γ = (1 − keep_prob)/(bt·bh·bw) · (T·H·W)/((T − bt + 1)(H − bh + 1)(W − bw + 1)): the 2-D rule
  with volumes for areas. The same layer handles both ranks (what torchvision calls DropBlock3d).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from retrofit.layers.ramps import linear_ramp
from retrofit.layers.tensor_state import MirroredRate, TensorState, scalar

__all__ = ["DropBlock", "drop_block", "dropblock_gamma", "expected_drop_fraction"]


def _check(keep_prob: float, block_size: int, gamma_scale: float = 1.0) -> None:
    if not 0.0 < keep_prob <= 1.0:
        raise ValueError(f"keep_prob has to be in (0, 1], but got {keep_prob}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size has to be an integer >= 1, but got {block_size!r}")
    if not gamma_scale > 0.0:
        raise ValueError(f"gamma_scale has to be > 0, but got {gamma_scale}")


def _sides(block_size: int, dims: tuple[int, ...]) -> tuple[int, ...]:
    """Block sides for a map of ``dims`` (H, W) or (T, H, W): square min(bs, H, W) on 2-D maps
    (the paper's clamp), each side clamped to its own dimension on 3-D maps (module docstring)."""
    if len(dims) == 2:
        bs = min(block_size, *dims)
        return (bs, bs)
    return tuple(min(block_size, d) for d in dims)


def dropblock_gamma(
    keep_prob: float,
    block_size: int,
    height: int,
    width: int,
    *,
    depth: int | None = None,
    gamma_scale: float = 1.0,
) -> float:
    """Seed rate γ of the paper for an H × W map (T × H × W with ``depth``), times
    ``gamma_scale``; block sides clamped as in :func:`drop_block`."""
    dims = (height, width) if depth is None else (depth, height, width)
    sides = _sides(block_size, dims)
    volume = valid = total = 1
    for d, b in zip(dims, sides, strict=True):
        volume, valid, total = volume * b, valid * (d - b + 1), total * d
    return gamma_scale * (1.0 - keep_prob) / volume * total / valid


@functools.lru_cache(maxsize=64)
def _band(valid: int, block_size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(valid + bs − 1) × valid 0/1 matrix B with B[i, s] = 1 iff s <= i < s + bs: the rows
    (or columns) covered by the block anchored at valid seed position s. Cached (read-only):
    a layer sees one or two map sizes, and building it costs three kernel launches a call."""
    size = (valid + block_size - 1, valid)
    return torch.ones(size, dtype=dtype, device=device).tril_().triu_(1 - block_size)


# A compiled graph builds the bands once, as constants of the graph: no cache to consult (dynamo
# would trace through the lru_cache wrapper and warn about it).
_uncached_band = _band.__wrapped__


def _cover(seeds: Tensor, block_size: int) -> Tensor:
    """Number of blocks covering each activation: B_h · seeds · B_wᵀ for every map.

    ``seeds`` lives on the valid region (..., H − bs + 1, W − bs + 1); the result is (..., H, W)
    with seed (i, j) covering rows i..i+bs−1 and columns j..j+bs−1, a whole block inside the map
    for odd and even bs alike. This is the paper's max-pool expansion written as two small
    matmuls, because max_pool2d over one-channel maps is slow on CPU (measured here ~9x slower
    for the shared (32, 1, 14, 14) mask, ~20x for per-channel masks). Only ``count > 0`` is
    used, and that is exact in any precision autocast or TF32 may pick: a sum of non-negative
    0/1 products rounds to 0 only when every term is 0.
    """
    band = _uncached_band if torch.compiler.is_compiling() else _band
    rows = band(seeds.shape[-2], block_size, seeds.dtype, seeds.device)
    cols = band(seeds.shape[-1], block_size, seeds.dtype, seeds.device)
    # seeds @ colsᵀ first: a batched-by-2D product folds into one plain matmul.
    return rows @ (seeds @ cols.T)


def _cover3d(seeds: Tensor, sides: tuple[int, ...]) -> Tensor:
    """:func:`_cover` on (..., T − bt + 1, H − bh + 1, W − bw + 1) seeds: one band matrix per
    axis, the frames' band applied last (an einsum over the T axis)."""
    bt, bh, bw = sides
    band = _uncached_band if torch.compiler.is_compiling() else _band
    frames = band(seeds.shape[-3], bt, seeds.dtype, seeds.device)
    rows = band(seeds.shape[-2], bh, seeds.dtype, seeds.device)
    cols = band(seeds.shape[-1], bw, seeds.dtype, seeds.device)
    planes = rows @ (seeds @ cols.T)
    return torch.einsum("tv,...vhw->...thw", frames, planes)


def _cover_nd(seeds: Tensor, sides: tuple[int, ...]) -> Tensor:
    return _cover(seeds, sides[0]) if len(sides) == 2 else _cover3d(seeds, sides)


def _blocks_from_seeds(seeds: Tensor, block_size: int) -> Tensor:
    """1 on every activation covered by a block anchored at a seed, else 0 (seeds' dtype)."""
    return (_cover(seeds, block_size) > 0).to(seeds.dtype)


def expected_drop_fraction(
    keep_prob: float,
    block_size: int,
    height: int,
    width: int,
    *,
    depth: int | None = None,
    gamma_scale: float = 1.0,
) -> float:
    """Exact E[fraction of dropped activations] for the seeding above.

    Activation (i, j) is dropped unless all n(i, j) seed positions whose block covers it are
    empty: P = 1 − (1 − γ)^n(i, j). This is below 1 − keep_prob because blocks overlap and
    border activations are covered by fewer seed positions. ``depth``: a T × H × W map.
    """
    dims = (height, width) if depth is None else (depth, height, width)
    sides = _sides(block_size, dims)
    gamma = dropblock_gamma(
        keep_prob, block_size, height, width, depth=depth, gamma_scale=gamma_scale
    )
    valid = tuple(d - b + 1 for d, b in zip(dims, sides, strict=True))
    n = _cover_nd(torch.ones(valid, dtype=torch.float64), sides)
    return float((1.0 - (1.0 - gamma) ** n).mean())


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return torch.contiguous_format
    return torch.channels_last


def _apply_blocks(x: Tensor, seeds: Tensor, sides: tuple[int, ...], scale: bool = True) -> Tensor:
    """x · block_mask · count / kept (without the rescale when ``scale`` is False); the mask is
    built in the seeds' float32 (float64 for float64 x) and cast to x's dtype last: in bf16 a
    sum of ones stops being exact above 256."""
    keep = _cover_nd(seeds, sides).eq_(0)  # in place: 1.0 where no block covers, else 0.0
    if scale:
        kept = keep.sum()
        # kept == 0 means everything is dropped; any finite scale then gives the right zeros.
        keep.mul_(keep.numel() / kept.clamp_min(1.0))
    keep = keep.to(dtype=x.dtype)
    if keep.shape[1] != 1:
        # Per-channel masks are as big as x: give them x's layout so the multiply stays
        # a plain elementwise pass and the output keeps x's memory format.
        keep = keep.contiguous(memory_format=_memory_format(x))
    return x * keep


def drop_block(
    x: Tensor,
    keep_prob: float | Tensor,
    block_size: int,
    per_channel: bool = False,
    training: bool = True,
    generator: torch.Generator | None = None,
    gamma_scale: float = 1.0,
    scale: bool = True,
) -> Tensor:
    """DropBlock (Ghiasi et al. 2018) on an (N, C, H, W) or video (N, C, T, H, W) feature map.

    Args:
        x: feature map, any float dtype (bf16/fp16 under AMP are kept) and memory format.
        keep_prob: target fraction of kept activations, in (0, 1]; 1 is the identity. A 0-dim
            tensor is read inside the computation (no host sync, nothing a compiler guards on):
            it is not range-checked, γ is not checked to be <= 1, and keep_prob 1 is not a
            shortcut (it draws no seeds and scales by 1: the same values as x).
        block_size: side of the dropped squares (cubes on 5-D maps), >= 1; clamped to min(H, W)
            on 4-D maps, to each dimension on 5-D maps.
        per_channel: draw an independent mask per channel instead of one (N, 1, …) mask shared
            by all channels.
        training: if False, return x.
        generator: optional RNG, on x's device.
        gamma_scale: factor on the seed rate γ (timm's ``gamma_scale``), > 0.
        scale: rescale the kept activations by count/kept (timm's ``scale_by_keep``).

    Returns:
        x · block_mask · count(block_mask) / count_ones(block_mask) (x · block_mask when
        ``scale`` is False).
    """
    if isinstance(x, torch.fx.Proxy):  # imported by name: see stochastic_depth
        args = (x, keep_prob, block_size, per_channel, training, generator, gamma_scale, scale)
        return x.tracer.create_proxy("call_function", _drop_block, args, {})
    as_tensor = isinstance(keep_prob, Tensor)
    _check(0.5 if as_tensor else keep_prob, block_size, gamma_scale)
    if x.ndim not in (4, 5):
        raise ValueError(
            "drop_block expects a 4-D (N, C, H, W) or 5-D (N, C, T, H, W) input, but got shape "
            f"{tuple(x.shape)}"
        )
    if not training or (not as_tensor and keep_prob == 1.0):
        return x
    n, c, *dims = x.shape
    sides = _sides(block_size, tuple(dims))
    gamma = dropblock_gamma(
        keep_prob,
        block_size,
        dims[-2],
        dims[-1],
        depth=dims[0] if len(dims) == 3 else None,
        gamma_scale=gamma_scale,
    )
    if not as_tensor and gamma > 1.0:
        raise ValueError(
            f"seed rate gamma = {gamma:.3g} > 1 for keep_prob {keep_prob}, block_size {block_size}, "
            f"gamma_scale {gamma_scale} on a {'×'.join(map(str, dims))} map; lower gamma_scale"
        )
    mask_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    valid = tuple(d - b + 1 for d, b in zip(dims, sides, strict=True))
    shape = (n, c if per_channel else 1, *valid)
    if as_tensor:
        u = torch.rand(shape, dtype=mask_dtype, device=x.device, generator=generator)
        seeds = (u < gamma).to(mask_dtype)
    else:
        seeds = torch.empty(shape, dtype=mask_dtype, device=x.device)
        seeds.bernoulli_(gamma, generator=generator)
    return _apply_blocks(x, seeds, sides, scale)


torch.fx.wrap("drop_block")
_drop_block = drop_block


class DropBlock(nn.Module):
    """DropBlock layer over :func:`drop_block`, with the paper's linear keep_prob schedule.

    Attributes (may be changed between steps):
        target_keep_prob: keep_prob reached at the end of the ramp (the recipe's ``keep_prob``).
        keep_prob: the current value. It starts at 1.0 (training progress 0, no dropping) and
            follows ``set_progress``; a training loop calls ``retrofit.schedule.update(model, t)``
            once per step. A layer never driven by the schedule never drops anything, and warns
            once about it. Under ``torch.compile`` the layer reads a 0-dim tensor copy of it
            (:mod:`retrofit.layers.tensor_state`), so the ramp never recompiles; the layer holds
            no buffers, so the model keeps its ``state_dict`` keys.
        block_size, per_channel, gamma_scale, scale: as in :func:`drop_block`.
        ramp: fraction of training over which keep_prob goes from 1 to its target, in (0, 1].

    4-D and 5-D (video) maps alike: the rank of the input decides.
    """

    kind = "dropblock"
    identity_in_eval = True  # see retrofit.layers.protocol.EvalIdentity
    # The current keep_prob: a float, mirrored in the tensor compiled graphs read.
    keep_prob = MirroredRate()

    def __init__(
        self,
        keep_prob: float = 0.9,
        block_size: int = 7,
        per_channel: bool = False,
        ramp: float = 1.0,
        gamma_scale: float = 1.0,
        scale: bool = True,
    ) -> None:
        super().__init__()
        _check(keep_prob, block_size, gamma_scale)
        if not 0.0 < ramp <= 1.0:
            raise ValueError(f"ramp has to be in (0, 1], but got {ramp}")
        self._t = TensorState(keep_prob=scalar(1.0, torch.float32))
        self.keep_prob = 1.0
        self.target_keep_prob = keep_prob
        self.block_size = block_size
        self.per_channel = per_channel
        self.ramp = ramp
        self.gamma_scale = gamma_scale
        self.scale = scale
        self._scheduled = False

    def _apply(self, fn: Any, recurse: bool = True) -> DropBlock:
        super()._apply(fn, recurse)
        self._t.apply(fn)
        return self

    def set_progress(self, t: float) -> None:
        """keep_prob = 1 − min(t / ramp, 1) · (1 − target_keep_prob) for training progress t."""
        self.keep_prob = linear_ramp(t, 1.0, self.target_keep_prob, self.ramp)
        self._scheduled = True

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            if not self.training:
                return x
            return drop_block(
                x,
                self._t.keep_prob,
                self.block_size,
                self.per_channel,
                True,
                None,
                self.gamma_scale,
                self.scale,
            )
        if (
            self.training
            and not self._scheduled
            and self.keep_prob == 1.0
            and self.target_keep_prob < 1.0
            and torch.is_grad_enabled()  # under no_grad it is a check (verify), not training
            and isinstance(x, Tensor)
            and not torch.compiler.is_compiling()
        ):
            warnings.warn(
                "DropBlock is at keep_prob=1.0 (drops nothing) because its schedule was never "
                "set; call retrofit.schedule.update(model, t) once per training step",
                stacklevel=2,
            )
            self._scheduled = True  # warn once
        return drop_block(
            x,
            self.keep_prob,
            self.block_size,
            self.per_channel,
            self.training,
            None,
            self.gamma_scale,
            self.scale,
        )

    def rates(self) -> dict[str, Any]:
        """Settings for logging (``retrofit.layers.protocol.Reporting``)."""
        return {
            "keep_prob": self.keep_prob,
            "target_keep_prob": self.target_keep_prob,
            "block_size": self.block_size,
            "per_channel": self.per_channel,
            "ramp": self.ramp,
            "gamma_scale": self.gamma_scale,
            "scale": self.scale,
        }

    def extra_repr(self) -> str:
        return (
            f"keep_prob={self.keep_prob:.4f}, target_keep_prob={self.target_keep_prob}, "
            f"block_size={self.block_size}, per_channel={self.per_channel}, ramp={self.ramp}"
            + (f", gamma_scale={self.gamma_scale}" if self.gamma_scale != 1.0 else "")
            + (", scale=False" if not self.scale else "")
        )
