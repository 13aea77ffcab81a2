"""ShakeDrop: shake a residual branch by a random factor, even a negative one, in training.

Yamada, Iwamura, Akiba, Kise, "ShakeDrop Regularization for Deep Residual Learning", IEEE Access
2019 (arXiv:1802.02375). On the residual branch F of block l,

    training forward   G(x) = x + (b_l + α − b_l·α)·F(x)
    training backward  G(x) = x + (b_l + β − b_l·β)·F(x)     (the gradient through F uses β)
    test               G(x) = x + E[b_l + α − b_l·α]·F(x)

with b_l ~ Bernoulli(p_l), p_l from stochastic depth's linear decay rule (Huang et al. 2016),
α ~ U[−1, 1] and β ~ U[0, 1] drawn independently per sample. When b_l = 1 the block is an
ordinary residual block; when b_l = 0 the branch is multiplied by α forward and β backward.

**Inverted form** (what retrofit inserts): E[b_l + α − b_l·α] = p_l + (1 − p_l)·E[α] = p_l for
a symmetric α range, so this layer divides the training factors (forward and backward alike) by
p_l and is the identity in eval: G(x) = x + F(x), the pretrained model's inference unchanged
(``retrofit.verify`` proves it). The expectation of the training forward is the paper's test
output divided by p_l, as inverted dropout and inverted stochastic depth do.

The layer multiplies the branch output (the mask form of ``retrofit.layers.stochastic_depth``):
``shake = ShakeDrop(survival=p_l); out = shortcut + shake(f(x))``. The backward factor is a
custom ``torch.autograd.Function`` (:class:`ShakeDropFunction`): forward multiplies by one
tensor, backward by another.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.fx
from torch import Tensor, nn

from retrofit.layers.tensor_state import TensorState, scalar

__all__ = ["MODES", "ShakeDrop", "ShakeDropFunction", "ShakeDraws", "shake_draws", "shake_drop"]

# ``batch``: one b_l per call for the whole batch (as the authors' "batch level"); ``row``: one
# b_l per sample. α and β are per sample in both.
MODES = ("batch", "row")


def _check(
    survival: float, alpha_range: tuple[float, float], beta_range: tuple[float, float], mode: str
) -> None:
    # Same shape of message as torchvision.ops.stochastic_depth: quote the value and the range.
    if not 0.0 < survival <= 1.0:
        raise ValueError(f"survival probability has to be in (0, 1], but got {survival}")
    low, high = alpha_range
    if not (-1.0 <= low <= high <= 1.0 and low == -high):
        # Symmetric: E[α] = 0, so E[b + α − bα] = p_l and the inverted eval is the identity.
        raise ValueError(f"alpha_range has to be [-a, a] with a in [0, 1], but got {alpha_range}")
    if not (len(beta_range) == 2 and 0.0 <= beta_range[0] <= beta_range[1] <= 1.0):
        raise ValueError(f"beta_range has to be [low, high] within [0, 1], but got {beta_range}")
    if mode not in MODES:
        raise ValueError(f"mode has to be one of {', '.join(MODES)}, but got {mode!r}")


class ShakeDraws(NamedTuple):
    """One call's draws, one value per sample: ``keep`` b (0/1), ``alpha``, ``beta``."""

    keep: Tensor
    alpha: Tensor
    beta: Tensor


def shake_draws(
    n: int,
    survival: float,
    *,
    alpha_range: tuple[float, float] = (-1.0, 1.0),
    beta_range: tuple[float, float] = (0.0, 1.0),
    mode: str = "batch",
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> ShakeDraws:
    """b ~ Bernoulli(p_l) (one for the batch, or per sample), α ~ U[alpha_range] and
    β ~ U[beta_range] per sample, as float32 vectors of length ``n``."""
    shape = (n,) if mode == "row" else (1,)
    keep = torch.empty(shape, device=device).bernoulli_(survival, generator=generator)
    a = torch.empty(n, device=device).uniform_(*alpha_range, generator=generator)
    b = torch.empty(n, device=device).uniform_(*beta_range, generator=generator)
    return ShakeDraws(keep.expand(n), a, b)


class ShakeDropFunction(torch.autograd.Function):
    """y = x·forward_factor; dy/dx taken as backward_factor (the factors broadcast to x)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, forward_factor: Tensor, backward_factor: Tensor) -> Tensor:
        ctx.save_for_backward(backward_factor)
        return x * forward_factor

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (factor,) = ctx.saved_tensors
        return grad * factor, None, None


def shake_drop(
    x: Tensor,
    survival: float,
    training: bool = True,
    *,
    alpha_range: tuple[float, float] = (-1.0, 1.0),
    beta_range: tuple[float, float] = (0.0, 1.0),
    mode: str = "batch",
    generator: torch.Generator | None = None,
    draws: ShakeDraws | None = None,
) -> Tensor:
    """ShakeDrop (Yamada et al. 2018), inverted, on a residual branch output ``x`` = F(x).

    Training: x·(b + α − bα)/p_l forward, gradient ·(b + β − bβ)/p_l; eval: x.

    Args:
        x: the branch output (N, ...); dtype and layout are kept.
        survival: p_l = P(b = 1), in (0, 1].
        training: if False, return x (the inverted form's eval is the identity).
        alpha_range: α ~ U[alpha_range] (the paper: [−1, 1]); symmetric, so E[α] = 0.
        beta_range: β ~ U[beta_range] (the paper: [0, 1]).
        mode: ``batch`` (one b per call) or ``row`` (one b per sample).
        generator: RNG for the draws, on x's device.
        draws: the draws to use instead of drawing (tests; :func:`shake_draws`).
    """
    if isinstance(x, torch.fx.Proxy):  # a tracer sees one node (see stochastic_depth)
        kwargs = dict(alpha_range=alpha_range, beta_range=beta_range, mode=mode,
                      generator=generator, draws=draws)  # fmt: skip
        return x.tracer.create_proxy("call_function", _shake_drop, (x, survival, training), kwargs)
    _check(survival, alpha_range, beta_range, mode)
    if not training:
        return x
    d = draws or shake_draws(
        x.shape[0], survival, alpha_range=alpha_range, beta_range=beta_range, mode=mode,
        device=x.device, generator=generator,
    )  # fmt: skip
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    forward = ((d.keep + d.alpha - d.keep * d.alpha) / survival).view(shape).to(x.dtype)
    backward = ((d.keep + d.beta - d.keep * d.beta) / survival).view(shape).to(x.dtype)
    return ShakeDropFunction.apply(x, forward, backward)


torch.fx.wrap("shake_drop")
_shake_drop = shake_drop


class ShakeDrop(nn.Module):
    """ShakeDrop on one residual branch (see :func:`shake_drop`); no parameters or buffers.

    ``survival`` (p_l), ``alpha_range``, ``beta_range``, ``mode`` and ``depth`` (l, for plans and plots) are
    plain attributes. It counts the training samples it saw and those with b = 1 (``calls``,
    ``kept``, in-graph tensors: ``retrofit.layers.tensor_state``) for the statistics.
    """

    kind = "shakedrop"
    identity_in_eval = True  # see retrofit.layers.protocol.EvalIdentity

    def __init__(
        self,
        survival: float = 0.5,
        *,
        alpha_range: tuple[float, float] = (-1.0, 1.0),
        beta_range: tuple[float, float] = (0.0, 1.0),
        mode: str = "batch",
        depth: int | None = None,
    ) -> None:
        super().__init__()
        alpha_range = (float(alpha_range[0]), float(alpha_range[1]))
        beta_range = (float(beta_range[0]), float(beta_range[1]))
        _check(survival, alpha_range, beta_range, mode)
        self.survival = float(survival)
        self.alpha_range = alpha_range
        self.beta_range = beta_range
        self.mode = mode
        self.depth = depth
        self._t = TensorState(calls=scalar(0, torch.int64), kept=scalar(0, torch.int64))

    def _apply(self, fn: Any, recurse: bool = True) -> ShakeDrop:
        super()._apply(fn, recurse)
        self._t.apply(fn)
        return self

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        d = shake_draws(x.shape[0], self.survival, alpha_range=self.alpha_range,
                        beta_range=self.beta_range, mode=self.mode, device=x.device)  # fmt: skip
        self._t.calls.add_(x.shape[0])
        self._t.kept.add_(d.keep.sum().to(torch.int64))
        return shake_drop(x, self.survival, True, alpha_range=self.alpha_range,
                          beta_range=self.beta_range, mode=self.mode, draws=d)  # fmt: skip

    def reset_stats(self) -> None:
        """Start a new measuring window (``retrofit.layers.protocol.Counting``)."""
        self._t.calls.zero_()
        self._t.kept.zero_()

    def rates(self) -> dict[str, Any]:
        """Settings and counters for logging (``retrofit.layers.protocol.Reporting``);
        ``kept_fraction``: the fraction of samples with b = 1 (None before a training call)."""
        calls, kept = int(self._t.calls), int(self._t.kept)
        return {
            "depth": self.depth,
            "survival": self.survival,
            "target_survival": self.survival,
            "alpha_range": list(self.alpha_range),
            "beta_range": list(self.beta_range),
            "mode": self.mode,
            "calls": calls,
            "kept": kept,
            "kept_fraction": kept / calls if calls else None,
        }

    def extra_repr(self) -> str:
        depth = f"depth={self.depth}, " if self.depth is not None else ""
        return (
            f"{depth}survival={self.survival:.4f}, alpha_range={list(self.alpha_range)}, "
            f"beta_range={list(self.beta_range)}, mode={self.mode}"
        )
