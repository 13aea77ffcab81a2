"""Uout: multiplicative uniform noise, a Dropout whose variance shift is small.

Li, Chen, Hu, Yang, "Understanding the Disharmony between Dropout and Batch Normalization by
Variance Shift", CVPR 2019 (https://arxiv.org/abs/1801.05134). A Dropout placed before a
BatchNorm changes the variance of the activations between training and inference, so BN's
running_var no longer matches what it sees at test time ("variance shift"). Their remedy
replaces Bernoulli dropout by

    y = x + x·r,   r ~ U(−β, β) i.i.d. per element,

which keeps E[y] = x and, for zero-mean x, scales the variance only by 1 + β²/3 in training
(instead of 1/p for inverted dropout with keep rate p); at inference Uout is the identity.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import Tensor, nn

__all__ = ["Uout", "uout"]


def _check(beta: float) -> None:
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"beta has to be in (0, 1], but got {beta}")


def uout(
    x: Tensor, beta: float, training: bool = True, generator: torch.Generator | None = None
) -> Tensor:
    """Uout (Li et al. 2019): y = x + x·r, r ~ U(−β, β) elementwise; x itself when not training.

    Args:
        x: any tensor; dtype and memory format are kept.
        beta: half-width of the noise interval, in (0, 1].
        training: if False, return x.
        generator: optional RNG, on x's device.
    """
    if isinstance(x, torch.fx.Proxy):  # imported by name: see stochastic_depth
        return x.tracer.create_proxy("call_function", _uout, (x, beta, training, generator), {})
    _check(beta)
    if not training:
        return x
    # Draw 1 + r directly: one random tensor (like x, same layout) and one multiply.
    noise = torch.empty_like(x).uniform_(1.0 - beta, 1.0 + beta, generator=generator)
    return x * noise


torch.fx.wrap("uout")
_uout = uout


class Uout(nn.Module):
    """Uout layer over :func:`uout`; ``beta`` is a plain attribute, no parameters or buffers."""

    identity_in_eval = True  # see retrofit.layers.protocol.EvalIdentity

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        _check(beta)
        self.beta = beta

    def forward(self, x: Tensor) -> Tensor:
        return uout(x, self.beta, self.training)

    kind = "uout"

    def rates(self) -> dict[str, float]:
        """Settings for logging (``retrofit.layers.protocol.Reporting``)."""
        return {"beta": self.beta}

    def extra_repr(self) -> str:
        return f"beta={self.beta}"
