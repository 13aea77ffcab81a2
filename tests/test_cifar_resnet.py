"""examples/cifar_resnet.py: the paper's CIFAR ResNets as a user model, retrofitted by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import retrofit
from retrofit.cli import main
from retrofit.models import create_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_resnet110_has_the_papers_54_blocks_and_survival_rule(shortcut):
    # Huang et al. 2016: ResNet-110 has 54 residual blocks; with p_L = 0.5 the linear rule gives
    # p_l = 1 − (l/54)·0.5, from 1 − 0.5/54 at the first block to 0.5 at the last.
    model, info = create_model(
        "examples.cifar_resnet:resnet110", kwargs={"shortcut": shortcut}, meta=True
    )
    assert info.source == "user"
    plan = retrofit.plan(model, {"stochastic_depth": {"p_L": 0.5}})
    sd = [e for e in plan.edits if e.kind == "stochastic_depth"]
    assert len(sd) == 54
    assert [e.depth for e in sd] == list(range(1, 55))
    assert [e.module for e in sd] == [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(18)]
    for e in sd:
        assert e.survival == pytest.approx(1 - e.depth / 54 * 0.5, abs=1e-12)
    assert sd[0].survival == pytest.approx(1 - 0.5 / 54) and sd[-1].survival == pytest.approx(0.5)


def test_cli_plans_resnet110_through_the_factory_name(capsys):
    code = main(["--model", "examples.cifar_resnet:resnet110", "--recipe",
                 str(ROOT / "recipes" / "sd.yaml"), "--json"])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["source"] == "user" and out["class"] == "CifarResNet"
    assert sum(e["kind"] == "stochastic_depth" for e in out["edits"]) == 54


@pytest.mark.parametrize(
    "name, blocks, params",
    # He et al. 2016, Table 6 (CIFAR-10): ResNet-20 0.27M, -32 0.46M, -44 0.66M, -56 0.85M,
    # -110 1.7M parameters, with option-A (parameter-free) shortcuts.
    [("resnet20", 9, 0.27), ("resnet32", 15, 0.46), ("resnet44", 21, 0.66),
     ("resnet56", 27, 0.85), ("resnet110", 54, 1.7)],
)  # fmt: skip
def test_depth_and_parameter_count_match_the_paper(name, blocks, params):
    model, _ = create_model(f"examples.cifar_resnet:{name}", meta=True)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(convs) + len(linears) == 6 * (blocks // 3) + 2  # 6n + 2 weighted layers
    n_params = sum(p.numel() for p in model.parameters())
    assert round(n_params / 1e6, 2 if params < 1 else 1) == params


def test_option_a_shortcut_subsamples_and_zero_pads():
    from examples.cifar_resnet import BasicBlock

    block = BasicBlock(16, 32, stride=2, shortcut="A")
    assert not list(block.shortcut.parameters())
    x = torch.randn(2, 16, 8, 8)
    s = block.shortcut(x)
    assert s.shape == (2, 32, 4, 4)
    assert torch.equal(s[:, :16], x[:, :, ::2, ::2]) and not s[:, 16:].any()


def test_retrofitted_resnet20_trains_its_gates_and_keeps_eval_output():
    from examples.cifar_resnet import resnet20

    torch.manual_seed(0)
    model = resnet20(num_classes=10, in_chans=1).eval()
    x = torch.randn(4, 1, 16, 16)
    before = model(x)
    retrofit.apply(model, {"stochastic_depth": {"p_L": 0.5, "mode": "batch"}}, example_input=x)
    assert torch.allclose(model.eval()(x), before, atol=1e-6)  # eval output unchanged
    gates = [m for m in model.modules() if type(m).__name__ == "StochasticDepthGate"]
    assert len(gates) == 9
    model.train()
    for _ in range(8):  # P(no block dropped in 8 steps) = Π p_l^8 < 1e-9
        model(x).sum().backward()
    assert all(g.calls > 0 for g in gates)  # every gate ran in training
    assert 0 < sum(g.kept for g in gates) < sum(g.calls for g in gates)  # and some dropped
