"""One analysis context per model: it owns every trace and every finding made from them.

Planners, the rewrite, the stage and Dropout→BN analyses and the trainer all read the same
model; each used to trace it again. An :class:`Analysis` makes each trace once, when first
needed, and hands it out:

* ``calls``: what one real forward passes to every module (``capture/calls.py``), recorded only
  if some module cannot be traced with its arguments at their defaults;
* ``traced``: the model's graphs as it is (hierarchical: a forward that cannot be read is
  replaced by its children, ``capture/trace.py``); ``traced_training``: the same with every module
  in training mode (the Dropout→BN rule needs ``F.dropout(x, p, self.training)`` live);
* ``residual_sites``, ``stages``, ``dropout_bn``: the findings;
* ``owner_trace(owner)``: an owner's own forward with its children as leaves, specialised on
  its recorded call, in training mode — what batch mode's outline check reads and what the
  rewrite's first specialisation reuses. Cut from ``traced`` where that is exact
  (``capture/regions.py``), else traced.

``counts`` says how many traces of each kind were made (a test holds apply to it).
Nothing here changes the model.
"""

from __future__ import annotations

from collections import Counter
from functools import cached_property
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from retrofit.analysis.branch import NotOutlinable, branch_region, module_inplace
from retrofit.analysis.dataflow import locate
from retrofit.analysis.dropout_bn import DropoutBNAnalysis, find_dropout_bn
from retrofit.analysis.residual import ResidualSite, find_residual_sites
from retrofit.analysis.stages import Stage, StageAnalysis, analyse_stages
from retrofit.analysis.sums import regroup_sum
from retrofit.capture.calls import Call, NoCall, record_calls
from retrofit.capture.probe import default_example_input, probe_input_size
from retrofit.capture.shapes import ShapePropError
from retrofit.capture.trace import Traced, TraceResult, cut_owner, trace, trace_graph
from retrofit.capture.training import training_mode

__all__ = ["Analysis", "probe_for", "stages"]


def probe_for(model: nn.Module, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A probe input for ``model``: random (seeded, the global RNG untouched) in the model's
    dtype, on its device — the meta device for a model built there."""
    device, dtype = torch.device("cpu"), torch.float32
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            device, dtype = tensor.device, tensor.dtype
            break
    shape = (batch, *probe_input_size(model))
    if device.type == "meta":
        return torch.empty(shape, dtype=dtype, device="meta")
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


class Analysis:
    """Everything retrofit reads about one model, computed once (see the module docstring)."""

    def __init__(self, model: nn.Module, example_input: Any = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"retrofit expects a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self._example_input = example_input
        self.counts: Counter[str] = Counter()
        self._owner_traces: dict[str, Traced | None] = {}
        self._refusals: dict[tuple[Any, ...], str | None] = {}
        self.recording_error: str | None = None
        self._recorded_output: list[Any] = []

    def recorded_output(self) -> Any:
        """What the recording forward returned (eval mode, on ``example_input``), if one ran
        (else None): ``apply`` reads its verification reference here instead of running the
        original once more."""
        if "calls" not in self.__dict__ or not self._recorded_output:
            return None
        return self._recorded_output[0]

    # ------------------------------------------------------------------ inputs and calls

    @cached_property
    def example_input(self) -> Any:
        if self._example_input is not None:
            return self._example_input
        # A model whose API takes other than one image batch (a torchvision detector: a list of
        # images) says so; else a batch of the model's input size.
        own = default_example_input(self.model)
        return own if own is not None else probe_for(self.model)

    @cached_property
    def calls(self) -> dict[str, list[Call]]:
        self.counts["recording forward"] += 1
        try:
            return record_calls(self.model, self.example_input, output=self._recorded_output)
        except Exception as exc:  # the model does not run on the probe: no specialisation
            self.recording_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            return {}

    def call(self, module: str) -> Call | None:
        """The first recorded call of ``module`` (qualified name, "" for the root), or None
        if it did not run on the probe.

        Raises:
            NoCall: the model could not run on the probe input at all (the message says why).
        """
        recorded = self.calls.get(module)
        if recorded:
            return recorded[0]
        if self.recording_error is not None:
            raise NoCall(
                f"no call recorded: the model does not run on the probe input "
                f"({self.recording_error}); pass example_input"
            )
        return None

    # ------------------------------------------------------------------ traces

    @cached_property
    def traced(self) -> TraceResult:
        self.counts["model trace"] += 1
        return trace(self.model, self.call)

    @cached_property
    def traced_training(self) -> TraceResult:
        if all(m.training for m in self.model.modules()):
            return self.traced
        self.counts["model trace"] += 1
        with training_mode(self.model):
            return trace(self.model, self.call)

    def owner_trace(self, owner: str) -> Traced | None:
        """``owner``'s own forward in training mode, children as leaves, specialised on its
        recorded call (None if it cannot be traced: the rewrite then says why). Cut from the
        model's trace where that is exact (``capture/regions.py``): no trace, no recorded
        call needed."""
        if owner not in self._owner_traces:
            cut = self._cut(owner)
            if cut is not None:
                self._owner_traces[owner] = cut
                return cut
            module = self.model.get_submodule(owner)
            saved = module.training
            module.training = True
            self.counts["owner trace"] += 1
            try:
                self._owner_traces[owner] = trace_graph(
                    module, shallow=True, call=self._call(owner)
                )
            except Exception:  # fx raises many types; the rewrite will raise the same, with context
                self._owner_traces[owner] = None
            finally:
                module.training = saved
        return self._owner_traces[owner]

    def _cut(self, owner: str) -> Traced | None:
        parts = [p for p in self.traced.parts if not p.prefix or owner.startswith(p.prefix + ".")]
        part = max(parts, key=lambda p: len(p.prefix), default=None)
        cut = cut_owner(part, owner) if part is not None else None
        if cut is not None:
            self.counts["owner cut"] += 1
        return cut

    def _call(self, module: str) -> Call | None:
        try:
            return self.call(module)
        except NoCall:
            return None

    def seed(self, owner: str) -> Traced | None:
        """A graph of ``owner`` for the rewrite to start from: one already made, or one cut
        from the model's trace (never a new trace: the rewrite traces what it needs itself)."""
        if owner not in self._owner_traces:
            # Only from a trace made before the rewrite began (the model is changing now).
            cut = self._cut(owner) if "traced" in self.__dict__ else None
            if cut is None:
                return None
            self._owner_traces[owner] = cut
        return self._owner_traces[owner]

    # ------------------------------------------------------------------ findings

    @cached_property
    def residual_sites(self) -> list[ResidualSite]:
        return find_residual_sites(self.traced)

    @cached_property
    def stages(self) -> StageAnalysis:
        # Shapes at the model's own input size (its config), the resolution it trains at, so a
        # block_size is clamped to the maps it will see, not to a small probe's. A model that
        # does not run at that size (a 32-px CIFAR net whose classifier flattens the last map)
        # is read at the example input, as ``retrofit.stages(model, example_input)`` reads
        # it. A root specialised on a recorded call uses that call's shapes.
        try:
            return analyse_stages(self.model, self.traced, calls=self._call)
        except ShapePropError:
            if self._example_input is None:
                raise
            return analyse_stages(self.model, self.traced, self._example_input, calls=self._call)

    @cached_property
    def dropout_bn(self) -> DropoutBNAnalysis:
        return find_dropout_bn(self.traced_training)

    def outline_refusal(self, site: ResidualSite, *, subset: bool) -> str | None:
        """Why ``site``'s branch cannot be outlined (see retrofit.analysis.branch), or None.
        Asked once per kind of block: owners with one graph (``capture/structure.py``), one
        site and the same in-place children get one answer."""
        traced = self.owner_trace(site.owner)
        if traced is None:
            return None
        modules = dict(self.model.get_submodule(site.owner).named_modules())
        structure = traced.structure()
        key = None
        if structure is not None:
            inplace = tuple(
                module_inplace(modules[str(n.target)]) if str(n.target) in modules else None
                for n in traced.graph.nodes
                if n.op == "call_module"
            )
            key = (structure, inplace, site.key, site.ordinal, site.regroup, site.branch_arg)
            key += (subset,)
            if key in self._refusals:
                return self._refusals[key]
        refusal = self._outline_refusal(traced, modules, site, subset=subset)
        if key is not None:
            self._refusals[key] = refusal
        return refusal

    def _outline_refusal(
        self, traced: Traced, modules: dict[str, nn.Module], site: ResidualSite, *, subset: bool
    ) -> str | None:
        graph = traced.graph
        try:
            add = locate(graph, site.key, site.ordinal)
            if site.regroup is not None:
                # The rewrite regroups the sum first (retrofit.analysis.sums): so does the
                # check, on a copy (the trace is the rewrite's seed, and stays as traced).
                graph = fx.Graph()
                env: dict[fx.Node, fx.Node] = {}
                graph.output(graph.graph_copy(traced.graph, env))
                add = regroup_sum(graph, env[add], site.regroup)
            branch_region(graph, add, site.branch_arg, modules=modules, subset=subset)
        except NotOutlinable as e:
            return str(e)
        except (LookupError, ValueError):
            return None  # the rewrite locates it again and reports a mismatch
        return None


def stages(model: nn.Module, example_input: Any = None) -> list[Stage]:
    """The stages of a CNN, 1-based, for the probe input (``example_input`` or the model's size).

    >>> [(s.index, s.module, s.reduction) for s in stages(torchvision.models.resnet50())]
    [(1, 'layer1', 4), (2, 'layer2', 8), (3, 'layer3', 16), (4, 'layer4', 32)]

    These are the stages ``dropblock: {stages: [3, 4]}`` refers to (Ghiasi et al. 2018 put
    DropBlock in ResNet-50's groups 3 and 4). Works on the meta device. A model whose own forward
    cannot be one graph has its stages read part by part, on what one forward passes each part.

    Raises:
        NoConvStagesError: "DropBlock does not apply: no conv feature maps in VisionTransformer".
    """
    analysis = Analysis(model, example_input)
    return analyse_stages(model, analysis.traced, example_input, calls=analysis._call).stages
