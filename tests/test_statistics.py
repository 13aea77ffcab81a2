"""The numbers users read: kept fractions and survivals over every stochastic-depth site —
inserted gates and the model's own reused drop-path slots, survival 1.0 included — per block,
from the one source every consumer reads (``retrofit.schedule.summary`` / ``statistics``)."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torchvision

import retrofit
from retrofit import schedule

pytestmark = pytest.mark.usefixtures("one_thread")


def binomial_tol(p: float, n: int, sigmas: float = 5.0) -> float:
    return sigmas * math.sqrt(p * (1 - p) / n) + 1e-9


def train_forwards(model: torch.nn.Module, steps: int = 6, batch: int = 64) -> int:
    model.train()
    with torch.no_grad():  # the gates count training forwards; no backward needed here
        for _ in range(steps):
            model(torch.randn(batch, 3, 32, 32))
    return steps * batch


def test_drop_path_rate_on_resnet18_reports_kept_as_planned_per_block():
    # 06ee0fd: block 1 (survival exactly 1.0) counted no calls and reported kept 0.0, so the
    # mean read 0.83 against 0.95 planned.
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    retrofit.apply(
        model,
        {"stochastic_depth": {"drop_path_rate": 0.1}},
        example_input=torch.randn(1, 3, 32, 32),
    )
    n = train_forwards(model)
    stats = schedule.statistics(model)
    blocks = stats["blocks"]
    assert list(blocks) == list(range(1, 9))
    assert blocks[1]["survival"] == 1.0 and blocks[1]["kept_fraction"] == 1.0
    for depth, b in blocks.items():
        assert b["calls"] == n, depth
        assert abs(b["kept_fraction"] - b["target_survival"]) < binomial_tol(b["survival"], n)
    assert stats["sd_planned"] == pytest.approx(0.95)
    assert abs(stats["sd_kept"] - 0.95) < binomial_tol(0.95, 8 * n)


def test_timm_model_with_drop_path_rate_reports_all_blocks():
    # 06ee0fd: the 7 reused DropPath slots were not reported: survival covered 1 block of 8.
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10, drop_path_rate=0.1)
    keys = list(model.state_dict())
    retrofit.apply(
        model, {"stochastic_depth": {"p_L": 0.5}}, example_input=torch.randn(1, 3, 32, 32)
    )
    rates = schedule.current_rates(model)
    reused = [n for n, r in rates.items() if r.get("reused")]
    assert len(reused) == 7 and len(rates) == 8
    stats = schedule.statistics(model)
    assert "sd_kept" not in stats, "no training call yet: nothing measured"
    planned = [1 - (depth / 8) * 0.5 for depth in range(1, 9)]
    assert [b["target_survival"] for b in stats["blocks"].values()] == pytest.approx(planned)
    assert stats["sd_survival"] == pytest.approx(sum(planned) / 8)  # 0.72, not 0.938
    n = train_forwards(model)
    for depth, b in schedule.statistics(model)["blocks"].items():
        assert b["calls"] == n, depth
        assert abs(b["kept_fraction"] - b["survival"]) < binomial_tol(b["survival"], n), depth
    schedule.reset_stats(model)
    assert all(r["calls"] == 0 for r in schedule.current_rates(model).values())
    # the counters are not state: same keys, and strip removes them and the hooks
    assert list(model.state_dict()) == keys
    retrofit.strip(model)
    assert not schedule.current_rates(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    fresh = timm.create_model("resnet18", num_classes=10, drop_path_rate=0.1)
    fresh.load_state_dict(model.state_dict(), strict=True)


def test_an_eval_window_carries_no_training_statistic():
    model = torchvision.models.resnet18(num_classes=10)
    retrofit.apply(
        model, {"stochastic_depth": {"p_L": 0.5}}, example_input=torch.randn(1, 3, 32, 32)
    )
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    scalars = schedule.summary(schedule.current_rates(model))
    assert set(scalars) == {"sd_survival", "sd_planned"}
