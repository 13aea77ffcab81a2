"""The trainer on CPU: learning, exact resume, atomic checkpoints, stripped weights, DDP, data errors.

Models are tiny (a 4-block residual net at 16 px) and torch runs on one thread, so the whole file
takes well under a minute on two cores. Speed is measured by tools/bench_trainer.py, not here.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from retrofit.errors import ModelError, RecipeError
from retrofit.train import (
    DataError,
    LintFindingsError,
    TrainConfig,
    build_data,
    fit,
    load_weights,
    read_metrics,
)
from retrofit.train.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    save_checkpoint,
)
from retrofit.train.classifier import num_classes_of, resize_classifier
from retrofit.train.metrics import without_timing
from retrofit.train.sampler import ResumableSampler
from retrofit.weights import read_weights
from tests.task_models import Block  # the residual block of the tiny detector and segmenter

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyRes(nn.Module):
    """Two stages of two residual blocks, a Dropout before the head (draws from the global RNG)."""

    def __init__(self, num_classes: int = 1000, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.layer1 = nn.Sequential(Block(width), Block(width))
        self.down = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
        )
        self.layer2 = nn.Sequential(Block(2 * width), Block(2 * width))
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.down(self.layer1(self.stem(x))))
        return self.fc(self.drop(x.mean((2, 3))))


def small_cfg(**kw) -> TrainConfig:
    base = dict(
        epochs=2, batch_size=32, lr=3e-3, img_size=16, log_every=4, workers=0, warmup_epochs=0.5
    )
    return TrainConfig(**{**base, **kw})


SD_RECIPE = {
    "stochastic_depth": {"p_L": 0.5, "mode": "batch"},
    "cutout": {"n_holes": 1, "length": 4},
}


# ------------------------------------------------------------------ config


def test_train_config_validates_like_a_recipe():
    assert TrainConfig.from_dict(None) == TrainConfig()
    cfg = TrainConfig.from_dict({"epochs": 3, "lr": "1e-3", "clip_grad": 1.0, "amp": "bf16"})
    assert cfg.lr == 1e-3 and cfg.epochs == 3
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(RecipeError, match="did you mean 'epochs'") as e:
        TrainConfig.from_dict({"epoch": 3})
    assert e.value.field == "train.epoch"
    for bad in ({"epochs": 0}, {"epochs": 2.5}, {"lr": -1}, {"ema": "yes"}, {"amp": "fp8"}, {"sched": "cosin"},
                {"label_smoothing": 1.0}, {"val_fraction": 0}, {"opt": "adamx"}, {"channels_last": "on"},
                {"warmup_epochs": 5, "epochs": 5}, {"batch_size": True}):  # fmt: skip
        with pytest.raises(RecipeError) as e:
            TrainConfig.from_dict(bad)
        assert e.value.field.startswith("train.")
    with pytest.raises(RecipeError, match="did you mean 'cosine'"):
        TrainConfig.from_dict({"sched": "cosin"})


def test_recipe_train_section_is_a_train_config():
    import retrofit

    r = retrofit.load_recipe({"train": {"epochs": 4}})
    assert isinstance(r.train, TrainConfig) and r.train.epochs == 4
    with pytest.raises(RecipeError, match="train.warmup"):
        retrofit.load_recipe({"train": {"warmup": 1}})


# ------------------------------------------------------------------ data


def test_resumable_sampler_skips_exactly_what_was_consumed():
    whole = ResumableSampler(50, seed=3)
    whole.set_epoch(2)
    order = list(whole)
    part = ResumableSampler(50, seed=3)
    part.set_epoch(2)
    part.set_start(20)
    assert list(part) == order[20:]
    ranks = [ResumableSampler(50, num_replicas=2, rank=r, seed=3) for r in (0, 1)]
    a, b = (list(s) for s in ranks)
    assert len(a) == len(b) == 25 and not set(a) & set(b)


def test_digits_bundle_is_reproducible_and_normalised():
    model = TinyRes()
    cfg = small_cfg()
    b1, b2 = build_data(None, model, cfg), build_data(None, model, cfg)
    assert b1.num_classes == 10 and b1.input_size == (3, 16, 16)
    assert b1.train.num_samples + b1.val.num_samples == 1797
    x1, y1 = next(b1.train.iter_epoch(1))
    x2, y2 = next(b2.train.iter_epoch(1))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(next(b1.train.iter_epoch(0))[1], y1)  # another epoch, another order
    assert -3 < float(x1.mean()) < 3
    # default side without img_size: 32 px
    assert build_data(None, model, small_cfg(img_size=None)).input_size == (3, 32, 32)


@pytest.mark.parametrize(
    "make, what",
    [
        (lambda tmp: tmp / "missing", "no such file"),
        (lambda tmp: (tmp / "f.txt").write_text("x") and tmp / "f.txt", "is a file"),
        (lambda tmp: (tmp / "d").mkdir() or tmp / "d", "not train/ and val/"),
    ],
)
def test_bad_data_path_is_a_data_error(tmp_path, make, what):
    path = make(tmp_path)
    with pytest.raises(DataError, match=what) as e:
        build_data(str(path), TinyRes(), small_cfg())
    assert str(path) in str(e.value) and "ImageFolder" in str(e.value)
    assert isinstance(e.value, ValueError)


def _png_tree(root: Path, classes=("a", "b"), per_class=3) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
                    d / f"{i}.png"
                )


def test_image_folder_batches_are_seeded_per_sample(tmp_path):
    _png_tree(tmp_path)
    cfg = small_cfg(batch_size=2)
    b = build_data(tmp_path, TinyRes(), cfg)
    assert b.num_classes == 2 and b.class_names == ["a", "b"] and b.input_size == (3, 16, 16)
    batches = list(b.train.iter_epoch(epoch=1))
    assert len(batches) == b.train.num_batches == 3 and batches[0][0].shape == (2, 3, 16, 16)
    # random augmentation is a function of (seed, epoch, index): a resumed epoch sees the same images
    resumed = list(b.train.iter_epoch(epoch=1, start_batch=1))
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(batches[1:], resumed, strict=True))
    val = list(b.val.iter_epoch())
    assert sum(len(y) for _, y in val) == 6
    (tmp_path / "val" / "a").rename(tmp_path / "val" / "c")
    with pytest.raises(DataError, match="same class"):
        build_data(tmp_path, TinyRes(), cfg)


def test_cifar_directory_in_torchvision_format(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(base / name, "wb") as f:
            pickle.dump(
                {"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}, f
            )
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    with pytest.raises(DataError, match="CIFAR10 files are missing or corrupted"):
        build_data(tmp_path, TinyRes(), small_cfg(batch_size=4))
    # fake files: their md5 sums cannot match torchvision's
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    b = build_data(base, TinyRes(), small_cfg(batch_size=4))
    assert b.num_classes == 10 and b.train.num_samples == 20 and b.val.num_samples == 4
    x, y = next(b.train.iter_epoch())
    assert x.shape == (4, 3, 16, 16)


# ------------------------------------------------------------------ classifier & weights


def test_resize_classifier_torchvision_timm_and_user_models():
    import timm
    import torchvision

    class WithHeads(nn.Module):  # torchvision ViT keeps its head at heads.head
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(6, 4)
            self.heads = nn.Sequential()
            self.heads.add_module("head", nn.Linear(4, 1000))

        def forward(self, x):
            return self.heads(self.body(x))

    cases = [
        (torchvision.models.resnet18(), "fc", torch.randn(1, 3, 32, 32)),
        (torchvision.models.mobilenet_v3_small(), "classifier.3", torch.randn(1, 3, 32, 32)),
        (timm.create_model("test_resnet"), "reset_classifier", torch.randn(1, 3, 32, 32)),
        (WithHeads(), "heads.head", torch.randn(1, 6)),
    ]
    for model, where, x in cases:
        assert resize_classifier(model, 7) == where
        assert num_classes_of(model) == 7
        assert model.eval()(x).shape == (1, 7)
        assert resize_classifier(model, 7) is None  # already that size: kept


def test_load_weights_errors_name_the_file(tmp_path):
    model = TinyRes(10)
    torch.save(model.state_dict(), tmp_path / "ok.pt")
    load_weights(TinyRes(10), tmp_path / "ok.pt")
    with pytest.raises(ModelError, match="shape mismatch.*fc.weight"):
        load_weights(TinyRes(1000), tmp_path / "ok.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="junk.pt"):
        load_weights(model, tmp_path / "junk.pt")
    with pytest.raises(ModelError, match="no such file"):
        load_weights(model, tmp_path / "nope.safetensors")
    with pytest.raises(ModelError, match="missing key"):
        load_weights(nn.Sequential(nn.Linear(2, 2)), tmp_path / "ok.pt")


# ------------------------------------------------------------------ training


def test_short_cpu_run_lowers_training_loss(tmp_path):
    res = fit(
        TinyRes(),
        None,
        None,
        out=tmp_path,
        device="cpu",
        progress=False,
        config=small_cfg(epochs=3),
    )
    assert res.completed and res.step == res.total_steps == 3 * (1437 // 32)
    steps = [r for r in res.history if r["kind"] == "step"]
    epochs = [r for r in res.history if r["kind"] == "epoch"]
    assert len(epochs) == 3
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert epochs[-1]["val_top1"] > 50.0  # 10 classes: chance is 10%
    for name in (
        "metrics.jsonl",
        "curves.png",
        "lint.json",
        "recipe.yaml",
        "model.safetensors",
        "model.json",
        CHECKPOINT_NAME,
    ):
        assert (tmp_path / name).is_file(), name
    assert read_metrics(tmp_path / "metrics.jsonl") == res.history
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["num_classes"] == 10 and meta["architecture"].endswith("TinyRes")
    load_weights(TinyRes(num_classes=10), res.weights)


def _run(tmp: Path, recipe, cfg: TrainConfig, **kw):
    torch.manual_seed(0)  # the model's initial weights
    return fit(TinyRes(), recipe, None, out=tmp, device="cpu", progress=False, config=cfg, **kw)


@pytest.mark.parametrize("with_recipe", [False, True])
def test_resume_after_interrupt_is_exact(tmp_path, with_recipe):
    recipe = SD_RECIPE if with_recipe else None
    cfg = small_cfg(
        grad_accum=2, ema=True, ema_decay=0.9, clip_grad=5.0, log_every=3, label_smoothing=0.1
    )
    whole = _run(tmp_path / "whole", recipe, cfg)
    # stop mid-epoch, mid log-window; then resume twice more (one stop at an epoch boundary)
    steps_per_epoch = whole.total_steps // cfg.epochs
    first = _run(tmp_path / "cut", recipe, cfg, max_steps=7)
    assert first.stop_reason == "max_steps" and first.step == 7 and not first.completed
    second = _run(tmp_path / "cut", recipe, cfg, resume=True, max_steps=steps_per_epoch)
    assert second.step == steps_per_epoch
    last = _run(tmp_path / "cut", recipe, cfg, resume=True)
    assert last.completed and last.step == whole.step
    a = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    b = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert without_timing(a) == without_timing(b)
    if with_recipe:
        assert any(r.get("sd_kept") is not None for r in a)
    wa, wb = read_weights(whole.weights), read_weights(last.weights)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ea = read_weights(tmp_path / "whole" / "model_ema.safetensors")
    eb = read_weights(tmp_path / "cut" / "model_ema.safetensors")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


def test_checkpoint_killed_mid_write_leaves_the_previous_one(tmp_path, monkeypatch):
    import retrofit.train.checkpoint as ck

    cfg = small_cfg(epochs=1)
    _run(tmp_path, None, cfg, max_steps=3)
    path = tmp_path / CHECKPOINT_NAME
    before = path.read_bytes()

    def torn(obj, f):
        f.write(b"PK\x03\x04 half a zip")  # what a process killed mid-torch.save leaves
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ck, "_serialize", torn)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, None, cfg, resume=True, max_steps=5)
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 3
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"format": "x"}, path)
    assert load_checkpoint(path)["step"] == 3
    monkeypatch.undo()
    res = _run(tmp_path, None, cfg, resume=True, max_steps=5)
    assert res.step == 5


def test_sigterm_saves_and_stops_cleanly(tmp_path, monkeypatch):
    import retrofit.train.loop as loop

    real = loop._train_step
    calls = {"n": 0}

    def step_then_term(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step: the step still completes
        return real(*a, **kw)

    monkeypatch.setattr(loop, "_train_step", step_then_term)
    previous = signal.getsignal(signal.SIGTERM)
    res = _run(tmp_path, None, small_cfg(epochs=1))
    assert res.stop_reason == "SIGTERM" and res.step == 3 and res.weights is None
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["step"] == 3
    assert signal.getsignal(signal.SIGTERM) == previous


def test_resume_with_a_foreign_checkpoint_is_a_model_error(tmp_path):
    cfg = small_cfg(epochs=1)
    _run(tmp_path, None, cfg, max_steps=1)
    state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    state["model"] = TinyRes(10, width=4).state_dict()
    save_checkpoint(state, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(ModelError, match="does not fit TinyRes"):
        _run(tmp_path, None, cfg, resume=True)
    del state["optimizer"]
    save_checkpoint(state, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(ModelError, match="incomplete: no optimizer"):
        _run(tmp_path, None, cfg, resume=True)
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"garbage")
    with pytest.raises(ModelError, match="cannot be read"):
        _run(tmp_path, None, small_cfg(epochs=1), resume=True)


def test_stripped_weights_load_into_the_original_class(tmp_path):
    res = _run(tmp_path, SD_RECIPE, small_cfg(epochs=1), max_steps=6)
    assert (tmp_path / "plan.json").is_file() and (tmp_path / "survival.png").is_file()
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert sum(e["kind"] == "stochastic_depth" for e in plan["edits"]) == 4
    assert "forward" not in res.model.layer1[0].__dict__  # stripped: the class's own forward
    fresh = load_weights(TinyRes(num_classes=res.num_classes), res.weights, strict=True)
    x = torch.randn(8, 3, 16, 16)
    assert torch.equal(fresh.eval()(x), res.model.eval()(x))
    import retrofit

    assert retrofit.load_recipe(tmp_path / "recipe.yaml").stochastic_depth.mode == "batch"


def test_torchvision_resnet18_weights_load_with_its_num_classes(tmp_path):
    import torchvision

    torch.manual_seed(0)
    res = fit(torchvision.models.resnet18(), {"stochastic_depth": {}}, None, out=tmp_path, device="cpu",
              progress=False, max_steps=2, config=small_cfg(epochs=1, img_size=32))  # fmt: skip
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["architecture"] == "resnet" or meta["num_classes"] == 10
    fresh = torchvision.models.resnet18(num_classes=meta["num_classes"])
    load_weights(fresh, tmp_path / "model.safetensors", strict=True)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(fresh.eval()(x), res.model.eval()(x))


def test_strict_lint_refuses_to_train_with_findings(tmp_path):
    class DropBeforeBN(nn.Module):
        def __init__(self, num_classes: int = 10) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.drop = nn.Dropout(0.5)
            self.conv2 = nn.Conv2d(8, 8, 3)
            self.bn = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, num_classes)

        def forward(self, x):
            return self.fc(self.bn(self.conv2(self.drop(self.conv(x)))).mean((2, 3)))

    with pytest.raises(LintFindingsError, match="finding") as refused:
        fit(DropBeforeBN(), None, None, out=tmp_path, device="cpu", progress=False, strict_lint=True,
            config=small_cfg(epochs=1))  # fmt: skip
    assert refused.value.findings[0]["norm"] == "bn"
    # Refused before anything is written: the retry with a fixing recipe may use the same out.
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ torchrun


DDP_SCRIPT = """
import sys, torch
sys.path.insert(0, {root!r})  # the repo root: test_train imports tests.task_models
torch.set_num_threads(1)
from tests.test_train import TinyRes, small_cfg, SD_RECIPE
from retrofit.train import fit
import torch.distributed as dist
torch.manual_seed(int(sys.argv[2]))  # different initial weights per rank: DDP must broadcast rank 0's
recipe = SD_RECIPE
res = fit(TinyRes(), recipe, None, out=sys.argv[1], device="cpu", progress=False, max_steps=6,
          config=small_cfg(epochs=1, log_every=2))
rank = __import__("os").environ["RANK"]
torch.save(res.model.state_dict(), f"{{sys.argv[1]}}/rank{{rank}}.pt")
print("rank", rank, "done at step", res.step)
"""


@pytest.mark.slow
def test_two_process_ddp_through_torchrun(tmp_path):
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT.format(root=str(Path(__file__).resolve().parents[1])))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(script), str(out), "0"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s0 = torch.load(out / "rank0.pt", weights_only=True)
    s1 = torch.load(out / "rank1.pt", weights_only=True)
    assert s0.keys() == s1.keys()
    differ = [k for k in s0 if not torch.equal(s0[k], s1[k])]
    assert not differ, differ
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "step"] == [2, 4, 6]  # rank 0 alone writes
    ck = load_checkpoint(out / CHECKPOINT_NAME)
    assert ck["world_size"] == 2 and len(ck["per_rank"]) == 2
    assert (out / "model.safetensors").is_file()


def test_tensorboard_is_optional(tmp_path):
    import importlib.util

    cfg = small_cfg(epochs=1, tensorboard=True)
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(RecipeError, match="train.tensorboard"):
            _run(tmp_path, None, cfg, max_steps=4)
        assert list(tmp_path.iterdir()) == []  # refused before writing anything
    else:
        _run(tmp_path, None, cfg, max_steps=4)
        assert any((tmp_path / "tensorboard").iterdir())
