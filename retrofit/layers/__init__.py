"""Regularizer layers that retrofit inserts: each a functional form plus a small nn.Module.

See README.md in this folder for a method card per layer (formula, paper, hyper-parameters).
"""

from retrofit.layers.cutout import BatchCutout, Cutout, cutout
from retrofit.layers.dropblock import DropBlock, drop_block, dropblock_gamma, expected_drop_fraction
from retrofit.layers.shakedrop import ShakeDrop, shake_drop
from retrofit.layers.stochastic_depth import (
    StochasticDepthGate,
    is_gate,
    stochastic_depth,
    subset_rows,
)
from retrofit.layers.uout import Uout, uout

__all__ = [
    "BatchCutout",
    "Cutout",
    "DropBlock",
    "ShakeDrop",
    "StochasticDepthGate",
    "Uout",
    "cutout",
    "drop_block",
    "dropblock_gamma",
    "expected_drop_fraction",
    "is_gate",
    "shake_drop",
    "stochastic_depth",
    "subset_rows",
    "uout",
]
