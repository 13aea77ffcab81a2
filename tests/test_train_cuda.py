"""The trainer's CUDA path: AMP (bf16 / fp16 + GradScaler), channels_last, torch.compile.

Skipped without a GPU. The CPU tests in test_train.py cover the logic; these check that the same
code runs on the device with mixed precision and that its artefacts are still right.
"""

from __future__ import annotations

import json

import pytest
import torch

from retrofit.train import TrainConfig, fit, load_weights
from retrofit.train.checkpoint import CHECKPOINT_NAME, load_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SD_RECIPE = {
    "stochastic_depth": {"p_L": 0.5, "mode": "batch"},
    "cutout": {"n_holes": 1, "length": 8},
}


def _resnet18():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18()


@pytest.mark.parametrize("amp", ["auto", "fp16"])
def test_amp_channels_last_run_learns_and_exports(tmp_path, amp):
    import torchvision

    cfg = TrainConfig(epochs=2, batch_size=64, lr=2e-3, img_size=32, ema=True, amp=amp, log_every=5)
    res = fit(_resnet18(), SD_RECIPE, None, out=tmp_path, device="cuda", progress=False, config=cfg)
    epochs = [r for r in res.history if r["kind"] == "epoch"]
    assert res.completed and epochs[-1]["val_top1"] > 30.0, epochs
    steps = [r for r in res.history if r["kind"] == "step"]
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert all(r["sd_kept"] is not None for r in steps)
    ck = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert (ck["scaler"] is not None) == (amp == "fp16")
    assert "cuda" in ck["per_rank"][0]["rng"]
    meta = json.loads((tmp_path / "model.json").read_text())
    fresh = torchvision.models.resnet18(num_classes=meta["num_classes"])
    load_weights(fresh, res.weights, strict=True)
    fresh, model = fresh.cuda().eval(), res.model.cuda().eval()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_resume_on_cuda_continues_the_run(tmp_path):
    cfg = TrainConfig(epochs=1, batch_size=64, img_size=32, log_every=4)
    first = fit(
        _resnet18(),
        SD_RECIPE,
        None,
        out=tmp_path,
        device="cuda",
        progress=False,
        max_steps=6,
        config=cfg,
    )
    assert first.step == 6
    last = fit(
        _resnet18(),
        SD_RECIPE,
        None,
        out=tmp_path,
        device="cuda",
        progress=False,
        resume=True,
        config=cfg,
    )
    assert last.completed and last.step == last.total_steps
    steps = [r["step"] for r in last.history if r["kind"] == "step"]
    assert steps == sorted(set(steps))  # no step logged twice across the interruption


@pytest.mark.slow
def test_compile(tmp_path):
    cfg = TrainConfig(epochs=1, batch_size=64, img_size=32, compile=True, log_every=5)
    res = fit(
        _resnet18(),
        SD_RECIPE,
        None,
        out=tmp_path,
        device="cuda",
        progress=False,
        max_steps=15,
        config=cfg,
    )
    assert res.step == 15 and all(
        r["loss"] == r["loss"] for r in res.history if r["kind"] == "step"
    )
