"""Stochastic depth: randomly skip a residual branch during training.

Huang, Sun, Liu, Sedra, Weinberger, "Deep Networks with Stochastic Depth", ECCV 2016
(https://arxiv.org/abs/1603.09382). Block l computes

    H_l = ReLU(b_l · f_l(H_{l-1}) + id(H_{l-1})),   b_l ~ Bernoulli(p_l)

with the survival probability p_l decaying linearly over depth, p_l = 1 − (l/L)(1 − p_L).
At test time the paper uses the expectation, H_l = ReLU(p_l · f_l + id) (``scaling="paper"``).
The variant used by timm's ``drop_path`` and torchvision's ``StochasticDepth`` divides the kept
branches by p_l in training and is the identity at test time (``scaling="inverted"``, default);
both have the same expectation, the inverted one leaves inference untouched, which is what lets
``retrofit.verify`` prove a rewrite did not change the model.

The gate multiplies the output of the residual branch f_l; it never sees the identity path.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import Tensor, nn

__all__ = ["StochasticDepthGate", "is_gate", "stochastic_depth", "subset_rows"]

MODES = ("row", "batch", "subset")
SCALINGS = ("inverted", "paper")


def _check(survival: float, mode: str, scaling: str) -> None:
    # Same shape of message as torchvision.ops.stochastic_depth: quote the value and the range.
    if not 0.0 < survival <= 1.0:
        raise ValueError(f"survival probability has to be in (0, 1], but got {survival}")
    if mode not in MODES:
        raise ValueError(f"mode has to be one of {', '.join(MODES)}, but got {mode!r}")
    if scaling not in SCALINGS:
        raise ValueError(f"scaling has to be one of {', '.join(SCALINGS)}, but got {scaling!r}")


def _subset_size(batch: int, survival: float) -> int:
    return max(1, min(batch, round(survival * batch)))


def subset_rows(
    batch: int,
    survival: float,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, float]:
    """Draw the rows kept by ``mode="subset"``: exactly ``k = max(1, round(survival·batch))``
    distinct rows, uniformly without replacement, and the inverted scale ``batch / k``.

    ``batch / k`` rather than ``1 / survival`` makes the expectation exact for the rounded k.
    A rewrite that wants the compute saving can evaluate f_l on ``x[index]`` only and
    ``index_add`` the scaled result onto the identity path.
    """
    k = _subset_size(batch, survival)
    index = torch.randperm(batch, device=device, generator=generator)[:k]
    return index, batch / k


def _keep_mask(
    x: Tensor, survival: float, mode: str, generator: torch.Generator | None
) -> tuple[Tensor, float]:
    """The 0/1 keep mask b (broadcastable to x, in x's dtype/device) and P(keep) for it."""
    if mode == "subset":
        index, scale = subset_rows(x.shape[0], survival, x.device, generator)
        mask = x.new_zeros((x.shape[0],) + (1,) * (x.ndim - 1))
        mask.index_fill_(0, index, 1.0)
        return mask, 1.0 / scale
    # As in timm's drop_path: one Bernoulli draw per row (or one per call), shape (N, 1, ..., 1),
    # so the mask costs N numbers and the only full-size op is the broadcast multiply.
    shape = (x.shape[0],) + (1,) * (x.ndim - 1) if mode == "row" else (1,) * x.ndim
    mask = x.new_empty(shape).bernoulli_(survival, generator=generator)
    return mask, survival


def stochastic_depth(
    x: Tensor,
    survival: float,
    mode: str = "row",
    training: bool = True,
    scaling: str = "inverted",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Stochastic depth (Huang et al. 2016) applied to the output x of a residual branch.

    Args:
        x: branch output, shape (N, ...), any dtype and memory format (both are preserved).
        survival: p_l, the probability that the branch is kept, in (0, 1].
        mode: ``"row"`` draws b ~ Bernoulli(p_l) per sample (mask (N, 1, ..., 1));
            ``"batch"`` draws one b for the whole batch per call (the paper's formulation);
            ``"subset"`` keeps exactly round(p_l·N) samples chosen without replacement.
        training: if False, return the inference form.
        scaling: ``"inverted"``: training x·b/p_l, inference x (returned as is);
            ``"paper"``: training x·b, inference x·p_l. In ``"subset"`` mode the inverted
            scale is N/k for the k kept rows.
        generator: optional RNG, on x's device.

    Returns:
        A tensor shaped like x. ``survival == 1`` returns x itself in every mode.
    """
    if isinstance(x, torch.fx.Proxy):
        # Reached when the caller imported this function by name, which torch.fx.wrap below does
        # not patch (it only patches this module's global): record the same single node.
        return x.tracer.create_proxy(
            "call_function",
            _stochastic_depth,
            (x, survival, mode, training, scaling, generator),
            {},
        )
    _check(survival, mode, scaling)
    if survival == 1.0:
        return x
    if not training:
        return x if scaling == "inverted" else x * survival
    mask, keep = _keep_mask(x, survival, mode, generator)
    if scaling == "inverted":
        # In place on the small mask, not on x: one full-size op in total (the multiply).
        mask.div_(keep)
    return x * mask


# One call_function node for torch.fx: the random mask never becomes part of a traced graph.
torch.fx.wrap("stochastic_depth")
_stochastic_depth = stochastic_depth  # the unpatched function, for the Proxy branch above


def _graph_capture(x: Tensor) -> bool:
    """True while torch.fx or torch.compile is tracing: no Python side effects then."""
    return (
        isinstance(x, torch.fx.Proxy) or torch.compiler.is_compiling() or torch.jit.is_scripting()
    )


class StochasticDepthGate(nn.Module):
    """Multiplies a residual branch by b_l (see :func:`stochastic_depth`).

    ``survival``, ``mode``, ``scaling`` and ``depth`` (l, 1-based, for printing and plans) are
    plain attributes that may be changed between steps. The gate owns no parameters and no
    buffers, so inserting it leaves the model's state_dict keys unchanged.

    Statistics for logging, updated by every training forward outside graph capture:
    ``calls`` is the number of samples that went through the gate, ``kept`` how many of them
    kept their branch, ``kept_fraction = kept / max(calls, 1)``; ``reset_stats()`` zeroes them.
    Counting adds no work to the step: the gate keeps a reference to each step's small mask,
    counts them on their device in one batch every ``FOLD_EVERY`` steps and reads the count back
    (the only device sync) when ``kept`` is read. Counting with a reduction each step made the
    gate ~1.5x slower than timm's drop_path on an H100, where a gate's whole forward+backward is
    launch-bound at ~0.1 ms; deferred, the hot path is the draw, the multiply and a list append.
    Counting is skipped while torch.fx / torch.compile trace the gate.
    """

    FOLD_EVERY = 64

    def __init__(
        self,
        survival: float = 1.0,
        mode: str = "row",
        scaling: str = "inverted",
        depth: int | None = None,
    ) -> None:
        super().__init__()
        _check(survival, mode, scaling)
        self.survival = survival
        self.mode = mode
        self.scaling = scaling
        self.depth = depth
        self.calls = 0
        # Plain attributes, deliberately not buffers: counted on the host, masks not yet
        # counted (one row each per sample), and a device-side count not yet read back.
        self._kept = 0
        self._masks: list[Tensor] = []
        self._count_on_device: Tensor | None = None

    def _fold(self) -> None:
        """Count the pending masks on their device(s); no host sync unless the device changed."""
        if not self._masks:
            return
        by_device: dict[torch.device, list[Tensor]] = {}
        for mask in self._masks:
            by_device.setdefault(mask.device, []).append(mask.reshape(-1))
        self._masks = []
        for device, masks in by_device.items():
            count = torch.cat(masks).count_nonzero()
            acc = self._count_on_device
            if acc is not None and acc.device != device:
                self._kept += int(acc.item())
                acc = None
            self._count_on_device = count if acc is None else acc + count

    @property
    def kept(self) -> int:
        self._fold()
        if self._count_on_device is not None:
            self._kept += int(self._count_on_device.item())
            self._count_on_device = None
        return self._kept

    @kept.setter
    def kept(self, value: int) -> None:
        self._masks = []
        self._count_on_device = None
        self._kept = int(value)

    @property
    def kept_fraction(self) -> float:
        return self.kept / max(self.calls, 1)

    def reset_stats(self) -> None:
        self.calls = 0
        self.kept = 0

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.survival == 1.0 or _graph_capture(x):
            # Through the wrapped functional, so a tracer records one node.
            return stochastic_depth(x, self.survival, self.mode, self.training, self.scaling)
        _check(self.survival, self.mode, self.scaling)
        mask, keep = _keep_mask(x, self.survival, self.mode, None)
        n_rows = x.shape[0]
        self.calls += n_rows
        if self.mode == "subset":
            self._kept += _subset_size(n_rows, self.survival)  # known without reading the mask
        else:
            # Only a reference on the hot path; "batch": one draw stands for every row.
            self._masks.append(mask if self.mode == "row" else mask.expand(n_rows, *mask.shape[1:]))
            if len(self._masks) >= self.FOLD_EVERY:
                self._fold()
        if self.scaling == "inverted":
            mask.div_(keep)  # in place: the pending reference sees 1/p or 0, still countable
        return x * mask

    def extra_repr(self) -> str:
        depth = f"depth={self.depth}, " if self.depth is not None else ""
        return f"{depth}survival={self.survival:.4f}, mode={self.mode}, scaling={self.scaling}"


def is_gate(module: nn.Module) -> bool:
    """True for a stochastic-depth gate inserted by retrofit."""
    return isinstance(module, StochasticDepthGate)
