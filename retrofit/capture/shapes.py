"""Shape propagation on the meta device: every node's output shape, without real compute.

One pass, one job, in the spirit of ``torch.fx.passes.shape_prop.ShapeProp``: an ``fx.Interpreter``
runs a traced graph on meta tensors (shapes, dtypes and strides, no storage) and records on each
node ``meta["retrofit_shape"]`` — the output's shape as a tuple of ints, or None when the node
does not produce a single tensor. It never edits the graph.

What differs from ``ShapeProp``: the model does not have to be on the meta device. Weights on
the CPU or an accelerator stay where they are; each module call and attribute read sees meta
stand-ins (``torch.func.functional_call``), so a 25M-parameter model is propagated in
milliseconds, allocates nothing, and its ``state_dict`` is never touched — BatchNorm in training
mode updates the stand-in running statistics, not the real ones.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from retrofit.capture.sandbox import mode

__all__ = ["SHAPE", "ShapePropError", "MetaShapeProp", "meta_like", "propagate_shapes", "shape_of"]

SHAPE = "retrofit_shape"


class ShapePropError(RuntimeError):
    """An operation of the graph cannot run on meta tensors (data-dependent code, ``.item()`` …)."""


def meta_like(value: Any) -> Any:
    """``value`` with every tensor replaced by a meta tensor of the same shape, dtype and strides."""

    def convert(x: Any) -> Any:
        if isinstance(x, Tensor) and x.device.type != "meta":
            # Strides are kept so channels_last inputs stay channels_last on the meta device.
            return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
        return x

    return tree_map(convert, value)


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    """The recorded output shape of ``node`` (None: not a tensor, or not propagated)."""
    return node.meta.get(SHAPE)


class MetaShapeProp(fx.Interpreter):
    """Run ``gm`` on meta tensors and record each node's output shape in ``meta["retrofit_shape"]``.

    Parameters and buffers are replaced by meta stand-ins per call (tied weights share one
    stand-in, as ``functional_call`` requires), so the model itself may live on any device.
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self._stand_ins: dict[int, Tensor] = {}

    def _meta(self, tensor: Tensor) -> Tensor:
        if tensor.device.type == "meta":
            return tensor
        key = id(tensor)
        if key not in self._stand_ins:
            self._stand_ins[key] = meta_like(tensor)
        return self._stand_ins[key]

    def _state(self, module: nn.Module) -> dict[str, Tensor]:
        state = {name: self._meta(p) for name, p in module.named_parameters(remove_duplicate=False)}
        state.update(
            (name, self._meta(b))
            for name, b in module.named_buffers(remove_duplicate=False)
            if b is not None
        )
        return state

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        module = self.fetch_attr(target)
        tensors = [*module.parameters(), *module.buffers()]
        if all(t.device.type == "meta" for t in tensors):
            return module(*args, **kwargs)
        return torch.func.functional_call(module, self._state(module), tuple(args), dict(kwargs))

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().get_attr(target, args, kwargs)
        return self._meta(value) if isinstance(value, Tensor) else value

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as exc:
            where = n.meta.get("owner") or n.meta.get("owner_local") or "<root>"
            source = n.meta.get("source")
            raise ShapePropError(
                f"shape propagation on the meta device failed at node {n.name!r} "
                f"(module {where}{', ' + source if source else ''}): {type(exc).__name__}: {exc}"
            ) from exc
        n.meta[SHAPE] = tuple(int(s) for s in result.shape) if isinstance(result, Tensor) else None
        return result


def propagate_shapes(gm: fx.GraphModule, *inputs: Any) -> Any:
    """Record every node's output shape for ``inputs`` (any device; only their shapes are used).

    Returns the graph's output, as meta tensors.
    """
    # Eval mode: shapes do not depend on it, and BatchNorm in training mode refuses the batch of
    # one that the probe uses (LeViT, ResNeSt, SKNet… normalise (1, C) vectors).
    with mode(gm, False), torch.no_grad():
        return MetaShapeProp(gm).run(*meta_like(inputs))
