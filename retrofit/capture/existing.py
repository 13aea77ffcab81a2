"""The regularizers a model already has: kept as single nodes, recognised, reused.

A graph analysis must see an existing Dropout, drop path or DropBlock as one node — to find the
Dropout → BatchNorm pairs (``analysis/dropout_bn.py``), to reuse a drop-path slot instead of
stacking a second gate on it (``analysis/residual.py``, ``rewrite/execute.py``) — so the tracer keeps them as
leaves. Known by class: torch's dropouts, timm's ``DropPath``/``DropBlock2d``, torchvision's
``StochasticDepth``/``DropBlock*``, every layer retrofit inserts (``retrofit.layers``, read from its
exports so a new layer cannot be forgotten). Known by convention: a parameter-free module whose
class name ends in ``DropPath`` and that holds its rate in ``drop_prob`` — timm's convention, which
HF (``BeitDropPath``, ``SwinDropPath`` …) and hand-written models follow.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from torch import nn

__all__ = ["drop_rate_attribute", "is_existing_regularizer", "regularizer_types"]


@cache
def regularizer_types() -> tuple[type, ...]:
    """Regularizer classes known by name (see the module docstring)."""
    types: list[type] = [nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout]
    try:
        from timm.layers import DropBlock2d, DropPath

        types += [DropPath, DropBlock2d]
    except ImportError:  # pragma: no cover - timm is a dependency, but keep tracing usable without
        pass
    try:
        from torchvision.ops import DropBlock2d as TvDropBlock2d
        from torchvision.ops import DropBlock3d, StochasticDepth

        types += [StochasticDepth, TvDropBlock2d, DropBlock3d]
    except ImportError:  # pragma: no cover
        pass
    from retrofit import layers

    types += [
        value
        for value in vars(layers).values()
        if isinstance(value, type) and issubclass(value, nn.Module)
    ]
    return tuple(dict.fromkeys(types))


def drop_rate_attribute(module: nn.Module) -> tuple[str, dict[str, Any]] | None:
    """How to set the rate of an existing drop-path module: (attribute holding its drop
    probability, other attributes to set), or None if ``module`` is not one.

    torchvision's ``StochasticDepth`` (``p``, row mode); timm's ``DropPath`` and every other
    ``*DropPath`` class with a float ``drop_prob`` and no parameters.
    """
    name = type(module).__name__
    if name == "StochasticDepth":
        attr, extra = "p", {"mode": "row"}
    elif name.endswith("DropPath"):
        attr, extra = (
            "drop_prob",
            {"scale_by_keep": True} if hasattr(module, "scale_by_keep") else {},
        )
    else:
        return None
    if not isinstance(getattr(module, attr, None), float | int):
        return None
    if next(module.parameters(), None) is not None:
        return None
    return attr, extra


def is_existing_regularizer(module: nn.Module) -> bool:
    """A module every retrofit trace keeps as a leaf (see the module docstring)."""
    return isinstance(module, regularizer_types()) or drop_rate_attribute(module) is not None
