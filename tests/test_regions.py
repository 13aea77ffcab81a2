"""Owner graphs cut from the whole-model trace (retrofit/capture/regions.py) are the graphs a
shallow trace of the owner gives, node for node; where a cut would not be exact, the owner is
traced as before."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn

import retrofit
from retrofit.analysis.context import Analysis
from retrofit.capture.patching import trace_session
from retrofit.capture.trace import trace_graph
from tests.wild_models import CASES, IMAGE, image


def _nodes(graph: torch.fx.Graph) -> list[tuple]:
    """Each node's op, target, arguments (nodes by position) and owner: what the analyses and
    the generated code read."""
    index = {n: i for i, n in enumerate(graph.nodes)}

    def refs(a):
        return torch.fx.node.map_arg(a, lambda n: f"%{index[n]}")

    def target(t):
        # A function made per trace (a module held outside the tree, a constant): the same
        # call when it closes over the same objects.
        cells = getattr(t, "__closure__", None)
        return (t.__qualname__, *(id(c.cell_contents) for c in cells)) if cells else t

    return [
        (n.op, n.name, target(n.target), str(refs(n.args)), str(refs(n.kwargs)))
        + (n.meta["owner_local"],)
        for n in graph.nodes
    ]


def _compare(model: nn.Module, x) -> tuple[int, int, list[str]]:
    """(owners, owners cut, owners whose cut differs from their trace) over the owners of the
    model's residual sites."""
    analysis = Analysis(model, x)
    reference = Analysis(model, x)  # its recorded calls, for the shallow traces
    owners = sorted({s.owner for s in analysis.residual_sites})
    cut, differ = 0, []
    with trace_session():
        for owner in owners:
            before = analysis.counts["owner cut"]
            got = analysis.owner_trace(owner)
            if analysis.counts["owner cut"] == before:
                continue
            cut += 1
            module = model.get_submodule(owner)
            saved, module.training = module.training, True
            try:
                traced = trace_graph(module, shallow=True, call=reference.call(owner))
            finally:
                module.training = saved
            if traced.key.guard != "none":
                # The trace baked in what its call's shapes answered; the cut computes them
                # (more general, the same values): not comparable node for node.
                continue
            same = (
                _nodes(got.graph) == _nodes(traced.graph)
                and got.out_spec == traced.out_spec
                and got.read_training == traced.read_training
                and got.key.tensors == traced.key.tensors
                and got.key.spec == traced.key.spec
            )
            if not same:
                differ.append(owner)
    return len(owners), cut, differ


ZOO = {
    "tv.resnet18": lambda: torchvision.models.resnet18(),
    "tv.convnext_tiny": lambda: torchvision.models.convnext_tiny(),
    "tv.swin_t": lambda: torchvision.models.swin_t(),
    "tv.mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(),
    "timm.vit_tiny": lambda: timm.create_model("vit_tiny_patch16_224", img_size=32),
    "timm.efficientnet_b0": lambda: timm.create_model("efficientnet_b0"),
}


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_owners_are_cut_and_equal_their_traces(name):
    torch.manual_seed(0)
    owners, cut, differ = _compare(ZOO[name]().eval(), torch.randn(2, 3, 32, 32))
    assert owners > 0 and cut == owners  # the fast path is the path taken
    assert differ == []


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_wild_owners_cut_equal_their_traces(case):
    torch.manual_seed(0)
    model = case.build().eval()
    _, _, differ = _compare(model, image(0, size=case.extra.get("input", IMAGE)))
    assert differ == []


class ModeBlock(nn.Module):
    """A block whose own code reads ``self.training``: the eval-mode model trace holds its eval
    branch only, so it cannot be cut."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        h = self.conv(x)
        if self.training:
            h = h * 0.5
        return x + h


class PairChild(nn.Module):
    def __init__(self, c: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(x), x.mean()


class PairBlock(nn.Module):
    """Its child returns a tuple (``h, _ = self.pair(x)``): not one proxy, so not cut."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.pair = PairChild(c)

    def forward(self, x):
        h, _ = self.pair(x)
        return x + h


class StashBlock(nn.Module):
    """Reads a value its caller stored on it during the forward (``self.scale``): a node from
    outside its own call."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.scale = None

    def forward(self, x):
        return x + self.conv(x) * self.scale


class Net(nn.Module):
    def __init__(self, block: type[nn.Module]):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.ModuleList([block(), block()])
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            if isinstance(b, StashBlock):
                b.scale = x.mean()
            x = b(x)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("block", [ModeBlock, PairBlock, StashBlock])
def test_owners_that_cannot_be_cut_are_traced(block):
    torch.manual_seed(0)
    model = Net(block).eval()
    x = torch.randn(2, 3, 8, 8)
    analysis = Analysis(model, x)
    assert [s.owner for s in analysis.residual_sites] == ["blocks.0", "blocks.1"]
    for owner in ("blocks.0", "blocks.1"):
        assert analysis.owner_trace(owner) is not None
    assert analysis.counts["owner cut"] == 0 and analysis.counts["owner trace"] == 2
    if block is ModeBlock:
        assert analysis.owner_trace("blocks.0").read_training  # traced in training mode
    recipe = {"stochastic_depth": {"mode": "batch"}}
    if block is StashBlock:  # its trace alone reads the attribute as it is: None
        with pytest.raises(retrofit.RefusedError):
            retrofit.apply(model, recipe, example_input=x)
        assert all("forward" not in m.__dict__ for m in model.modules())
        return
    # the rewrite is verified and live from those traces
    retrofit.apply(model, recipe, example_input=x)
    assert len(retrofit.applied_plan(model).edits) == 2


def test_apply_cuts_instead_of_recording_and_tracing():
    """On a model every owner of which can be cut, planning makes one trace and no recording
    forward (the verification's reference is its own eval forward)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 32, 32)
    analysis = Analysis(model, x)
    retrofit.plan(model, {"stochastic_depth": {"mode": "batch"}}, analysis=analysis)
    assert analysis.counts == {"model trace": 1, "owner cut": 8}
