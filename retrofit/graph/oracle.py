"""The libraries' own drop-path placement, read from their graphs: the oracle for residual sites.

timm and torchvision put drop path (``DropPath``, ``StochasticDepth``) on the residual branches of
many of their models when built with a non-zero rate. Those placements were written by the
models' authors; where one feeds an add, that add's owning module is a block the library
considers residual. retrofit's residual analysis runs on the model built *without* drop path and
must find those blocks.
"""

from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx
from torch import nn

from retrofit.graph.dataflow import is_add
from retrofit.graph.residual import existing_drop_path
from retrofit.graph.trace import TraceResult, trace

__all__ = ["library_drop_path_owners"]


def _through_scales(node: fx.Node, gm: fx.GraphModule, hops: int = 3) -> list[fx.Node]:
    """Users of ``node``, looking through layer scales applied after the drop path
    (MetaFormer/PoolFormer: ``res_scale(x) + layer_scale(drop_path(mixer(x)))``)."""
    users = list(node.users)
    for _ in range(hops):
        nxt = []
        for u in users:
            scale = u.op == "call_module" and not any(
                p.ndim >= 2 and sum(d > 1 for d in p.shape) >= 2
                for p in gm.get_submodule(str(u.target)).parameters()
            )
            if scale or (u.op == "call_function" and u.target in (operator.mul, torch.mul)):
                nxt.extend(u.users)
            else:
                nxt.append(u)
        users = nxt
    return users


def library_drop_path_owners(model: nn.Module, traced: TraceResult | None = None) -> set[str]:
    """Owners of the adds fed by a library drop-path module in ``model``.

    timm's linear rate schedule gives block 0 a rate of 0, built as an ``nn.Identity`` in the
    drop-path slot. Such a slot counts when the same slot (its name with indices wildcarded) holds
    a real drop-path module in another block; slots that are Identity everywhere (iFormer's
    convolutional position encoding, built with rate 0 by design) do not.
    """
    traced = traced or trace(model)
    slots: list[tuple[str, str, bool]] = []  # (add owner, slot pattern, real drop path?)
    for part in traced.parts:
        gm = part.graph_module
        for node in gm.graph.nodes:
            kind = existing_drop_path(node, gm)
            if kind is None:
                continue
            pattern = re.sub(r"\.\d+(?=\.|$)", ".*", f"{part.prefix}.{node.target}")
            for user in _through_scales(node, gm):
                # ``out += identity_out`` with ``identity_out = 0`` (MobileOne without an
                # identity branch) is no residual: both operands must be graph values.
                if is_add(user) and all(isinstance(a, fx.Node) for a in user.args[:2]):
                    slots.append((user.meta["owner"], pattern, kind != "identity placeholder"))
    real = {pattern for _, pattern, is_real in slots if is_real}
    return {owner for owner, pattern, _ in slots if pattern in real}
