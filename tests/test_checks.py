"""The checks the acceptance tests rely on must themselves catch what they claim to catch."""

from __future__ import annotations

import torch
from torch import nn

from tests.checks import dead_modules, differences, snapshot, touched_modules
from tests.wild_models import OwnDropPathMixer, PlainBlock, image


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), PlainBlock(4))


def test_an_untouched_model_has_no_differences():
    model = _model()
    snap = snapshot(model, image(1))
    model(image(0))  # a training forward updates the three BatchNorms' statistics
    diffs = differences(model, snap)
    assert len(diffs) == 9 and all("running" in d or "num_batches" in d for d in diffs), diffs
    model = _model()
    snap = snapshot(model, image(1))
    assert differences(model, snap, image(1)) == []


def test_every_kind_of_leftover_is_reported():
    model = _model()
    snap = snapshot(model, image(1))
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] += 1.0
    model[2].forward = lambda x: x
    model[2].add_module("extra", nn.Identity())
    model[1] = nn.BatchNorm2d(4)
    model[2].__dict__["_leftover"] = 1
    found = "\n".join(differences(model, snap, image(1)))
    for what in (
        "state_dict['0.weight'] changed",
        "module tree differs",
        "module 1 was replaced",
        "instance forward left on ['2']",
        "2.__dict__ gained",
        "eval output differs",
    ):
        assert what in found, (what, found)


def test_touched_and_dead_modules():
    model = _model()
    snap = snapshot(model)
    model[2].add_module("never_called", nn.Identity())
    model[1] = nn.BatchNorm2d(4)  # replaced, and called by the Sequential
    assert touched_modules(model, snap) == ["1", "2.never_called"]
    assert dead_modules(model, image(0), touched_modules(model, snap)) == ["2.never_called"]
    # the liveness forward leaves the model as it was (BN statistics, training flags)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dead_modules(model, image(0), ["1"])
    assert not model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_changed_rate_counts_as_touched():
    model = OwnDropPathMixer()
    snap = snapshot(model)
    model.blocks[2].drop_path.drop_prob = 0.3
    assert touched_modules(model, snap) == ["blocks.2.drop_path"]
