"""Counter-based random draws: the same decisions in every process, and after a resumption.

A seeded stochastic-depth gate (``retrofit.layers.stochastic_depth``) makes the batch/subset
decision of its i-th training call from a key that is a function of ``(seed, stream, i)`` only —
``stream`` names the site — instead of the state of torch's global generator. Every data-parallel
rank then makes the same decisions (ranks skip the same blocks and stay in lock-step), and a run
resumed with the gate's ``draws`` counter continues the sequence. Counter-based like Philox
(Salmon et al. 2011, "Parallel Random Numbers: As Easy as 1, 2, 3"): the value is a function of
the counter, there is no generator state to carry.

Two forms: :func:`draw_key` on the host (blake2b) for eager calls, and :func:`counter_uniform`
inside a compiled graph (integer ops on tensors, where blake2b cannot run).
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

__all__ = ["counter_uniform", "draw_key", "site_base", "unit"]

_M32 = 0xFFFFFFFF


def draw_key(seed: int, stream: str, draw: int) -> int:
    """A 63-bit key for draw number ``draw`` of site ``stream`` under ``seed``.

    From blake2b rather than Python's ``hash``, which is salted per process: two processes, or a
    run and its resumption, get the same key.
    """
    digest = hashlib.blake2b(f"{seed}/{stream}/{draw}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def unit(key: int) -> float:
    """A uniform float in [0, 1) from a 63-bit key (its top 53 bits)."""
    return (key >> 10) * 2.0**-53


def site_base(seed: int | None, stream: str) -> int | None:
    """The site's 32-bit key for in-graph draws (None without a seed), computed on the host: a
    compiled graph cannot run blake2b, and reads this int as a constant (it changes only with
    the seed or the site)."""
    return None if seed is None else draw_key(seed, f"{stream}/compiled", 0) & _M32


def _mix32(h: Tensor) -> Tensor:
    """A 32-bit integer hash (two xor-shift-multiply rounds) on int64 tensors in [0, 2³²).

    The multiplier is below 2³¹, so no product leaves int64: the same bits on every device and
    backend (eager, inductor's C++ and Triton), which a hash with wrapping products would not
    promise.
    """
    h = ((h >> 16) ^ h) * 0x45D9F3B & _M32
    h = ((h >> 16) ^ h) * 0x45D9F3B & _M32
    return (h >> 16) ^ h


def counter_uniform(base: int, draw: Tensor, rows: int | None = None) -> Tensor:
    """Uniforms in [0, 1) (float32, 24 bits) for draw number ``draw`` (an int64 tensor) of the
    site keyed ``base`` (:func:`site_base`): one value, or one per row with ``rows``. Computed
    in the graph, a function of the counter like :func:`draw_key`."""
    h = _mix32((draw + base) & _M32)
    if rows is not None:
        index = torch.arange(rows, device=draw.device, dtype=torch.int64)
        h = _mix32(h ^ (index * 0x9E3779B1 & _M32))
    return (h >> 8).to(torch.float32) * 2.0**-24
