"""Capture by execution: traces specialised on real calls, rewritten forwards per call, and the
guarantees around them (all-or-nothing apply, liveness, plan without side effects, pickling).

The models here are small and written the way such code is written in the wild; each one
exercises one mechanism of capture/calls.py, capture/concrete.py and rewrite.RetrofitForward.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import retrofit
from retrofit.capture.calls import Call, CallKey
from retrofit.capture.trace import TRACES, trace_graph
from retrofit.layers import StochasticDepthGate


def gates(model: nn.Module) -> list[StochasticDepthGate]:
    return [m for m in model.modules() if isinstance(m, StochasticDepthGate)]


def conv_bn(c: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())


class PaddedBlock(nn.Module):
    """Pads odd maps to even before a strided op, as window-attention code does: control flow
    on the input's shape, and ``math.ceil`` of a shape (``float()`` of a Proxy)."""

    def __init__(self, c: int):
        super().__init__()
        self.f = nn.Sequential(conv_bn(c), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x):
        h, w = x.shape[-2:]
        if h % 2 or w % 2:
            x = F.pad(x, (0, w % 2, 0, h % 2))
        n = math.ceil(x.shape[-1] / 2)
        return (x + self.f(x))[..., : 2 * n]


class PaddedNet(nn.Module):
    def __init__(self, c: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.ModuleList([PaddedBlock(c) for _ in range(2)])
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean((2, 3)))


def test_shape_control_flow_is_specialised_and_guarded():
    torch.manual_seed(0)
    model = PaddedNet()
    original = copy.deepcopy(model)
    retrofit.apply(model, {"stochastic_depth": {}}, example_input=torch.randn(2, 3, 7, 7))
    assert [e.module for e in retrofit.applied_plan(model).edits] == ["blocks.0", "blocks.1"]
    forward = model.blocks[0].__dict__["forward"]
    assert forward.specialised[0].key.guard == "shape"  # it branched on x.shape
    for g in gates(model):
        g.survival = 1.0  # every branch kept: training output equals the original's
    model.train(), original.train()
    for size in (7, 8, 5):  # a new shape is a new specialisation, traced on that call
        x = torch.randn(3, 3, size, size)
        torch.testing.assert_close(model(x), original(x))
    # The probe's (2, 4, 7, 7) and the three (3, 4, s, s): a shape guard keys on whole shapes.
    assert len(forward.specialised) == 4
    # Eval runs the blocks' own code as written (the gates are the identity there): any shape,
    # nothing new to specialise.
    model.eval(), original.eval()
    x = torch.randn(3, 3, 9, 9)
    torch.testing.assert_close(model(x), original(x), rtol=0, atol=0)
    assert len(forward.specialised) == 4
    for g in gates(model):
        g.survival = 0.5
        g.reset_stats()
    model.train()
    model(torch.randn(3, 3, 6, 6)).sum().backward()
    assert all(g.calls == 3 for g in gates(model))


class RatedBlock(nn.Module):
    """EfficientNet-style: the caller passes each block its own drop-connect rate."""

    def __init__(self, c: int):
        super().__init__()
        self.f = nn.Sequential(conv_bn(c), nn.Conv2d(c, c, 1))

    def forward(self, x, drop_connect_rate: float | None = None):
        out = self.f(x)
        if self.training and drop_connect_rate:
            out = out * 1.0  # a user's own drop connect would go here
        return x + out


class RatedNet(nn.Module):
    def __init__(self, c: int = 4, n: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.ModuleList([RatedBlock(c) for _ in range(n)])

    def forward(self, x):
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            x = block(x, drop_connect_rate=0.2 * i / len(self.blocks))
        return x.mean((1, 2, 3))


def test_non_default_arguments_get_their_own_specialisation_and_gates_stay_live():
    model = RatedNet()
    retrofit.apply(model, {"stochastic_depth": {"p_L": 0.5}}, example_input=torch.randn(2, 3, 8, 8))
    model.train()
    model(torch.randn(4, 3, 8, 8))
    assert [g.calls for g in gates(model)] == [4, 4, 4]  # every gate ran: none is dead
    for i, block in enumerate(model.blocks):
        keys = block.__dict__["forward"].specialised
        assert {k.key.leaves[-1] for k in keys} == {0.2 * i / 3}  # the value the caller passes
    # A caller passing another value gets another specialisation, not the class's forward.
    forward = model.blocks[1].__dict__["forward"]
    training = [s for s in forward.specialised if s.training]
    model.blocks[1](torch.randn(2, 4, 8, 8), drop_connect_rate=0.5)
    assert gates(model)[1].calls == 6
    assert [s for s in forward.specialised if s.training] == [*training, forward.specialised[-1]]
    assert forward.specialised[-1].key.leaves[-1] == 0.5


class DataDependent(nn.Module):
    def __init__(self, c: int = 4):
        super().__init__()
        self.a = nn.Sequential(conv_bn(c), nn.Conv2d(c, c, 1))
        self.b = nn.Sequential(conv_bn(c), nn.Conv2d(c, c, 1))

    def forward(self, x):
        if x.mean() > 0:  # branches on data: no specialisation may bake this in
            return x + self.a(x)
        return x + self.b(x)


def test_control_flow_on_data_is_never_baked_in():
    torch.manual_seed(0)
    with pytest.raises(Exception, match="control flow on tensor data"):
        trace_graph(DataDependent(), call=Call((torch.randn(2, 4, 4, 4),)))
    model = nn.Sequential(nn.Conv2d(3, 4, 1), DataDependent())
    plan = retrofit.plan(model, {"stochastic_depth": {}})
    assert [s.module for s in plan.skipped] == ["<root>", "1"]  # then a and b, alone
    assert all("control flow on tensor data" in s.reason for s in plan.skipped)
    assert len(plan.edits) == 0 and len(plan.partial()) == 2  # no site, and a module unread
    with pytest.warns(retrofit.RetrofitWarning, match="could not be read"):
        retrofit.apply(model, {"stochastic_depth": {}})


class Cached(nn.Module):
    """HF LeViT's pattern: an eval-mode cache filled by the forward, in a dict on the module."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.f = nn.Sequential(conv_bn(c), nn.Conv2d(c, c, 1))
        self.bias = nn.Parameter(torch.zeros(c, 1, 1))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x):
        if self.training:
            bias = self.bias * 2
        else:
            key = str(x.device)
            if key not in self.cache:
                self.cache[key] = self.bias * 2
            bias = self.cache[key]
        return x + self.f(x) + bias


def test_plan_changes_nothing_and_can_be_repeated():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), Cached()).eval()
    before = {name: dict(m.__dict__) for name, m in model.named_modules()}
    first = retrofit.plan(model, {"stochastic_depth": {}})
    second = retrofit.plan(model, {"stochastic_depth": {}})
    assert first.to_dict() == second.to_dict() and len(first.edits) == 1
    assert model[1].cache == {}  # the cache the trace filled with a Proxy was put back
    for name, m in model.named_modules():
        assert m.__dict__.keys() == before[name].keys(), name


def test_applys_planning_restores_to_applys_own_snapshot(monkeypatch):
    """apply snapshots the model before it changes anything; while it plans (reading only), the
    trace's sandbox restores to that snapshot instead of taking another. The trace still puts
    the cache it filled with a Proxy back: the one the verification's eval forward fills is a
    real tensor. A retrofitted model is stripped first, so then the sandbox takes its own."""
    from retrofit.capture import sandbox

    roots: list[nn.Module] = []
    original = sandbox.Snapshot.__init__

    def counting(self, root):
        roots.append(root)
        original(self, root)

    monkeypatch.setattr(sandbox.Snapshot, "__init__", counting)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), Cached()).eval()
    x = torch.randn(2, 3, 8, 8)
    reference = model(x)
    model[1].cache.clear()
    retrofit.apply(model, {"stochastic_depth": {}}, example_input=x)
    # (Cached reads self.training: its own trace snapshots it, a part of the model.)
    assert sum(r is model for r in roots) == 1
    assert all(not isinstance(v, torch.fx.Proxy) for v in model[1].cache.values())
    torch.testing.assert_close(model(x), reference, rtol=0, atol=0)
    roots.clear()
    retrofit.apply(model, {"stochastic_depth": {}}, example_input=x)
    assert sum(r is model for r in roots) == 2


class Broken(Exception):
    pass


def test_a_failure_in_the_middle_of_a_rewrite_hands_the_model_back_unchanged(monkeypatch):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3)
    original = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    import retrofit.rewrite.execute as rw

    real = rw._install_forward
    installed = []

    def flaky(owner, name, edits):
        if len(installed) == 5:
            raise Broken(f"injected after {len(installed)} owners")
        installed.append(name)
        return real(owner, name, edits)

    monkeypatch.setattr(rw, "_install_forward", flaky)
    with pytest.raises(retrofit.RewriteError, match="injected after 5 owners"):
        retrofit.apply(model, {"stochastic_depth": {}}, example_input=x)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not gates(model) and not rw.is_retrofitted(model)
    assert [n for n, _ in model.named_modules()] == [n for n, _ in original.named_modules()]
    model.eval(), original.eval()
    assert torch.equal(model(x), original(x))


def test_traces_per_apply_one_per_owner():
    x = torch.randn(2, 3, 32, 32)
    for mode in ("row", "batch"):
        model = torchvision.models.resnet18()
        before = TRACES.copy()
        retrofit.apply(model, {"stochastic_depth": {"mode": mode}}, example_input=x)
        # One trace of the model, and each of its 8 blocks' graphs cut from it (none traced
        # again): batch mode's plan-time outline check reads the graph the rewrite then
        # specialises, and the block code never reads self.training, so one serves both modes.
        assert dict(TRACES - before) == {"deep": 1, "cut": 8}, mode


def test_pickled_model_keeps_live_gates_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3)
    retrofit.apply(
        model, {"stochastic_depth": {"mode": "batch"}}, example_input=torch.randn(2, 3, 32, 32)
    )
    path = tmp_path / "model.pt"
    torch.save(model, path)
    script = textwrap.dedent(
        f"""
        import torch
        from retrofit.layers import StochasticDepthGate
        model = torch.load({str(path)!r}, weights_only=False)
        gates = [m for m in model.modules() if isinstance(m, StochasticDepthGate)]
        for g in gates:
            g.survival = 1.0
        model.train()
        model(torch.randn(4, 3, 32, 32)).sum().backward()
        print(len(gates), sorted({{g.calls for g in gates}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["8", "[4]"]


def test_apply_does_not_load_the_trainer():
    script = textwrap.dedent(
        """
        import sys, torch, torchvision, retrofit
        model = torchvision.models.resnet18()
        retrofit.apply(model, {"dropblock": {}, "stochastic_depth": {}},
                       example_input=torch.randn(1, 3, 64, 64))
        print(sorted(m for m in sys.modules if m.split(".")[:2] == ["retrofit", "train"]))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_call_keys_guard_what_the_graph_assumed():
    x = torch.randn(2, 4, 8, 8)
    leaves, spec = Call((x,), {"mask": None, "scale": 2}).flatten()
    for guard, other, expected in [
        ("none", torch.randn(5, 4, 3, 3), True),
        ("rank", torch.randn(5, 4, 3, 3), True),
        ("rank", torch.randn(5, 4, 3), False),
        ("shape", torch.randn(2, 4, 8, 8), True),
        ("shape", torch.randn(3, 4, 8, 8), False),
    ]:
        key = CallKey.of(leaves, spec, guard)
        assert key.matches(*Call((other,), {"mask": None, "scale": 2}).flatten()) is expected
    key = CallKey.of(leaves, spec, "none")
    assert not key.matches(*Call((x,), {"mask": x, "scale": 2}).flatten())  # None → tensor
    assert not key.matches(*Call((x,), {"mask": None, "scale": 3}).flatten())  # baked value


class Body(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1), nn.BatchNorm2d(c), nn.ReLU())
        self.layers = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(c, c, 3, 2, 1), nn.ReLU(), nn.Conv2d(c, c, 3, 1, 1))
                for _ in range(3)
            ]
        )

    def forward(self, x):
        x = self.stem(x)
        for layer in self.layers:
            x = layer(x)
        return x


class Gated(nn.Module):
    """The model's own forward branches on the data; its encoder is readable on its own."""

    def __init__(self):
        super().__init__()
        self.body = Body()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        if x.mean() > 10:  # data-dependent: the root is never one graph
            return torch.zeros(x.shape[0], 3)
        return self.head(self.body(x).mean((2, 3)))


def test_stages_are_read_part_by_part_when_the_root_cannot_be():
    torch.manual_seed(0)
    model = Gated().eval()
    x = torch.randn(2, 3, 32, 32)
    found = retrofit.plan(
        model, {"dropblock": {"stages": [2, 3], "block_size": 3}}, example_input=x
    )
    assert [s.module for s in found.skipped] == ["<root>"]
    edits = found.by_kind("dropblock")
    assert [(e.module, e.target) for e in edits] == [
        ("body", "body.layers.1"),
        ("body", "body.layers.2"),
    ]
    reference = model(x)
    retrofit.apply(model, {"dropblock": {"stages": [2, 3], "block_size": 3}}, example_input=x)
    assert torch.equal(model(x), reference)
    # Blocks are planned inside the readable part (as on a detector's backbone); here the stage's
    # caller cannot be re-traced alone, and the refusal says so.
    blocks = {"placement": "blocks", "stages": [2, 3], "block_size": 3}
    with pytest.raises(retrofit.TraceError, match="cannot place DropBlock after stage 2"):
        retrofit.plan(Gated().eval(), {"dropblock": blocks}, example_input=x)
