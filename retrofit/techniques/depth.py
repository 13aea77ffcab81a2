"""Survival over depth: the rules that give residual block l of L its survival p_l.

Stochastic depth (Huang et al. 2016, "Deep Networks with Stochastic Depth") and ShakeDrop
(Yamada et al. 2018, which gates its branches "by the linear decay rule" of stochastic depth)
plan with them; ``retrofit.schedule`` re-exports them (its module docstring explains each rule).
Pure functions of (position, hyper-parameters).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["SCHEDULES", "block_survivals", "stage_of", "survival"]

# Survival rules over depth; the recipe's ``stochastic_depth.schedule`` is one of these.
SCHEDULES = ("linear", "uniform", "timm")


def survival(depth: int, num_blocks: int, p_L: float, schedule: str = "linear") -> float:
    """Survival probability p_l of block ``depth`` (l, 1-based) of ``num_blocks`` (L).

    ``linear``: 1 − (l/L)(1 − p_L) (Huang et al. 2016); ``uniform``: p_L; ``timm``:
    1 − (1 − p_L)·(l − 1)/(L − 1), block 1 never dropped (1.0 when L = 1, as timm's
    ``linspace(0, rate, 1)`` gives rate 0). See the module docstring.
    """
    if not 1 <= depth <= num_blocks:
        raise ValueError(f"depth has to be in 1..{num_blocks}, but got {depth}")
    if not 0.0 <= p_L <= 1.0:
        raise ValueError(f"p_L has to be in [0, 1], but got {p_L}")
    if schedule == "linear":
        return 1.0 - (depth / num_blocks) * (1.0 - p_L)
    if schedule == "uniform":
        return p_L
    if schedule == "timm":
        if num_blocks == 1:
            return 1.0
        return 1.0 - (1.0 - p_L) * (depth - 1) / (num_blocks - 1)
    raise ValueError(f"schedule has to be one of {', '.join(SCHEDULES)}, but got {schedule!r}")


def stage_of(block: str) -> str:
    """The stage of a residual block: the container holding it (its name less the last part).

    ``"layer3.1"`` → ``"layer3"``; ``"blocks.7"`` → ``"blocks"``; a residual add in the root's own
    code (block ``""``) is a stage of its own, ``""``.
    """
    return block.rpartition(".")[0]


def block_survivals(
    blocks: Sequence[str], p_L: float, schedule: str = "linear", *, stagewise: bool = False
) -> dict[str, float]:
    """p_l for each block, ``blocks`` in execution order (block l = position l, 1-based).

    With ``stagewise`` the rule runs over the stages (:func:`stage_of`, numbered by the order
    their first block appears) and every block of a stage gets its stage's value.
    """
    if not stagewise:
        return {b: survival(i, len(blocks), p_L, schedule) for i, b in enumerate(blocks, start=1)}
    stages = list(dict.fromkeys(stage_of(b) for b in blocks))
    index = {s: i for i, s in enumerate(stages, start=1)}
    return {b: survival(index[stage_of(b)], len(stages), p_L, schedule) for b in blocks}
