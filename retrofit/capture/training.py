"""The model traced as it runs in training: every module's ``training`` flag set.

fx bakes ``self.training`` into the graph, so what a training step does (an active
``F.dropout(x, p, self.training)``, a BatchNorm using batch statistics) is only visible in a trace
made in training mode. ``retrofit.analysis.context.Analysis`` owns the model's training trace;
``retrofit.lint`` traces a retrofitted model here, through its rewritten instance forward.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from torch import nn

from retrofit.capture.sandbox import mode
from retrofit.capture.trace import TracedPart, TraceResult, trace

__all__ = ["trace_training", "training_mode"]


def training_mode(model: nn.Module) -> AbstractContextManager[None]:
    """Every module in training mode, as when the model trains (``capture/sandbox.py``)."""
    return mode(model, True)


class _Holder(nn.Module):
    """Calls a model through ``nn.Module.__call__`` so fx sees its *instance* forward.

    fx traces a root through ``type(root).forward``; a retrofitted root carries its rewritten
    forward on the instance, and lint must see that one (a removed or replaced dropout).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def trace_training(model: nn.Module, calls: Any = None) -> TraceResult:
    """Trace ``model`` as it runs in training (every module's ``training`` flag set).

    A model whose root forward was rewritten by retrofit (an instance ``forward``) is traced
    through a holder module so that the rewritten forward is the one analysed. ``calls``: the
    recorded calls to specialise on (``retrofit.capture.trace.trace``).
    """
    with training_mode(model):
        if "forward" in model.__dict__:
            return _retarget(trace(_Holder(model)))
        return trace(model, calls)


def _retarget(traced: TraceResult) -> TraceResult:
    """Re-base a trace of ``_Holder(model)`` on ``model``: every name loses its ``model.`` prefix.

    The trace is this analysis's own and is not compiled again, so its nodes' call targets and
    owner metadata are renamed in place; the root part's module becomes the model itself.
    """

    def strip(name: str) -> str:
        return "" if name == "model" else name.removeprefix("model.")

    parts: list[TracedPart] = []
    for part in traced.parts:
        held = isinstance(part.module, _Holder)
        for node in part.graph_module.graph.nodes:
            node.meta["owner"] = strip(node.meta.get("owner", ""))
            if held:
                node.meta["owner_local"] = strip(node.meta.get("owner_local", ""))
                if node.op == "call_module":
                    node.target = strip(str(node.target))
        module = part.module.model if held else part.module
        parts.append(TracedPart(strip(part.prefix), module, part.graph_module))
    skipped = [
        type(s)(strip(s.module) or "<root>", s.reason)
        for s in traced.skipped
        if s.module != "<root>"
    ]
    return TraceResult(parts, skipped)
