"""Tests of the training-progress schedule: ramp values, update(), current_rates()."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from retrofit import schedule
from retrofit.layers import BatchCutout, DropBlock, StochasticDepthGate, Uout


def test_linear_ramp_values():
    assert schedule.linear_ramp(0.0, 1.0, 0.9) == 1.0
    assert schedule.linear_ramp(0.5, 1.0, 0.9) == 1 - 0.5 * (1 - 0.9)
    assert schedule.linear_ramp(0.5, 1.0, 0.9) == pytest.approx(0.95, abs=1e-15)
    assert schedule.linear_ramp(1.0, 1.0, 0.9) == 0.9
    # ramp = 0.5: the target is reached halfway through training and then held.
    assert schedule.linear_ramp(0.25, 1.0, 0.8, ramp=0.5) == pytest.approx(0.9, abs=1e-15)
    assert schedule.linear_ramp(0.5, 1.0, 0.8, ramp=0.5) == 0.8
    assert schedule.linear_ramp(0.75, 1.0, 0.8, ramp=0.5) == 0.8
    # Increasing ramps work too.
    assert schedule.linear_ramp(0.5, 0.0, 2.0) == 1.0


@pytest.mark.parametrize("ramp", [0.0, 1.5, -1.0])
def test_linear_ramp_rejects_bad_ramp(ramp):
    with pytest.raises(ValueError, match=rf"ramp.*\(0, 1\].*{ramp}"):
        schedule.linear_ramp(0.5, 1.0, 0.9, ramp=ramp)


def model_with_regularizers() -> nn.Module:
    return nn.Sequential(
        BatchCutout(1, 8),
        nn.Conv2d(1, 2, 3),
        DropBlock(keep_prob=0.9, block_size=3),
        nn.Sequential(nn.Conv2d(2, 2, 1), DropBlock(keep_prob=0.8, block_size=5, ramp=0.5)),
        StochasticDepthGate(0.75, depth=2),
        Uout(0.2),
    )


def test_update_ramps_every_dropblock():
    model = model_with_regularizers()
    first, second = model[2], model[3][1]
    assert (first.keep_prob, second.keep_prob) == (1.0, 1.0), "progress 0 before any update"
    schedule.update(model, 0.0)
    assert (first.keep_prob, second.keep_prob) == (1.0, 1.0)
    schedule.update(model, 0.5)
    assert first.keep_prob == pytest.approx(0.95, abs=1e-15)
    assert second.keep_prob == 0.8
    schedule.update(model, 1.0)
    assert (first.keep_prob, second.keep_prob) == (0.9, 0.8)
    assert model[4].survival == 0.75, "the survival schedule is over depth, not time"


def test_update_calls_any_set_progress():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.seen = []

        def set_progress(self, t):
            self.seen.append(t)

    model = nn.Sequential(nn.Linear(2, 2), Custom())
    schedule.update(model, 0.25)
    schedule.update(model, 1)
    assert model[1].seen == [0.25, 1.0]


@pytest.mark.parametrize("t", [-0.01, 1.01, math.nan, math.inf, "half", None])
def test_update_rejects_progress_outside_unit_interval(t):
    model = model_with_regularizers()
    schedule.update(model, 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        schedule.update(model, t)
    assert model[2].keep_prob == pytest.approx(0.95), "nothing changed on bad input"


def test_current_rates():
    model = model_with_regularizers()
    schedule.update(model, 1.0)
    model.train()(torch.randn(4, 1, 12, 12))
    rates = schedule.current_rates(model)
    assert set(rates) == {"0", "2", "3.1", "4", "5"}
    assert rates["2"] == {
        "kind": "dropblock",
        "keep_prob": 0.9,
        "target_keep_prob": 0.9,
        "block_size": 3,
        "per_channel": False,
        "ramp": 1.0,
        "gamma_scale": 1.0,
        "scale": True,
    }
    gate = rates["4"]
    assert gate["kind"] == "stochastic_depth" and gate["survival"] == 0.75 and gate["depth"] == 2
    assert gate["calls"] == 4 and gate["kept_fraction"] in {0.0, 0.25, 0.5, 0.75, 1.0}
    assert rates["5"] == {"kind": "uout", "beta": 0.2}
    assert gate["target_survival"] == 0.75 and gate["warmup"] == 0.0
    assert rates["0"] == {
        "kind": "cutout",
        "n_holes": 1,
        "length": 8,
        "uniform_sampling": False,
        "per_batch": False,
    }
