"""retrofit inside other training loops: PyTorch Lightning, the Hugging Face Trainer, timm's
train.py hook. Each runs a few real optimizer steps on the CPU with a tiny residual network and
shows the four things an integration promises (retrofit/integrations/__init__.py): the recipe is
applied at the start, the schedules advance every step (warm-up survival and DropBlock keep_prob,
read back from the framework's own log), checkpoints written during training load into the
original class with strict=True, and the model is stripped when training ends.

Lightning and transformers are optional extras: their tests are skipped only when the package
is not installed (CI installs both: .ci/run).
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import retrofit
from retrofit.layers import DropBlock, StochasticDepthGate
from retrofit.rewrite import is_retrofitted
from retrofit.schedule import block_survivals, linear_ramp, warmed_up
from tests.test_train import TinyRes

STEPS = 6
WARMUP = 0.5
RECIPE = {
    "stochastic_depth": {"p_L": 0.5, "warmup": WARMUP, "mode": "row"},
    "dropblock": {"stages": [1, 2], "block_size": 3, "keep_prob": 0.8},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def images(n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable toy task: the class is which quadrant is brightest."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    for i, q in enumerate(y.tolist()):
        r, c = divmod(q, 2)
        x[i, :, r * 8 : r * 8 + 8, c * 8 : c * 8 + 8] += 2.0
    return x, y


def expected_survival_mean(t: float) -> float:
    """Mean over TinyRes's 4 gates of the warmed-up linear-rule survival at progress t."""
    targets = block_survivals(["b1", "b2", "b3", "b4"], 0.5, "linear").values()
    return sum(warmed_up(t, p, WARMUP) for p in targets) / 4


def assert_schedule_advanced(survival: dict[int, float], keep: dict[int, float]) -> None:
    """``survival``/``keep`` map the step count *before* the step to the logged value."""
    assert sorted(survival) == list(range(STEPS)), survival
    for step, value in survival.items():
        assert value == pytest.approx(expected_survival_mean(step / STEPS), abs=1e-6), step
        assert keep[step] == pytest.approx(linear_ramp(step / STEPS, 1.0, 0.8), abs=1e-6), step
    assert survival[0] == 1.0 and keep[0] == 1.0  # progress 0: nothing dropped yet
    assert survival[STEPS - 1] < survival[1] < 1.0, "the warm-up moved survival down"


def assert_loads_strict(state: dict[str, torch.Tensor], prefix: str = "") -> None:
    fresh = TinyRes(num_classes=4)
    own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    fresh.load_state_dict(own, strict=True)


def assert_stripped(model: nn.Module) -> None:
    assert not is_retrofitted(model)
    assert not any(isinstance(m, (StochasticDepthGate, DropBlock)) for m in model.modules())
    assert all("forward" not in m.__dict__ for m in model.modules())


# ------------------------------------------------------------------ PyTorch Lightning

has_lightning = importlib.util.find_spec("lightning") is not None


@pytest.mark.skipif(not has_lightning, reason="the lightning extra is not installed")
def test_lightning_callback_applies_schedules_logs_and_strips(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from retrofit.integrations.lightning import RetrofitCallback

    class Lit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = TinyRes(num_classes=4)
            self.seen: list[float] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.model(x), y)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    torch.manual_seed(0)
    lit = Lit()
    x, y = images()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    callback = RetrofitCallback(RECIPE, example_input=x[:2])
    gates: list[StochasticDepthGate] = []

    class Spy(pl.Callback):
        """Runs after RetrofitCallback: the model is retrofitted and scheduled by then."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not gates:
                gates.extend(m for m in lit.model.modules() if isinstance(m, StochasticDepthGate))
            lit.seen.append(sum(g.survival for g in gates) / len(gates))

    trainer = pl.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        logger=CSVLogger(tmp_path, name="run"),
        log_every_n_steps=1,
        callbacks=[
            callback,
            Spy(),
            ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1),
        ],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(lit, loader)

    assert len(gates) == 4, "one gate per residual block of TinyRes"
    assert lit.seen == pytest.approx([expected_survival_mean(s / STEPS) for s in range(STEPS)])
    rows = list(csv.DictReader((Path(trainer.logger.log_dir) / "metrics.csv").open()))
    survival = {
        int(r["step"]): float(r["retrofit/sd_survival"])
        for r in rows
        if r.get("retrofit/sd_survival")
    }
    keep = {
        int(r["step"]): float(r["retrofit/keep_prob"]) for r in rows if r.get("retrofit/keep_prob")
    }
    kept = [float(r["retrofit/sd_kept"]) for r in rows if r.get("retrofit/sd_kept")]
    assert_schedule_advanced(survival, keep)
    assert all(0.0 <= k <= 1.0 for k in kept) and min(kept) < 1.0, "gates dropped something"
    assert_stripped(lit.model)
    checkpoints = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert len(checkpoints) == 2
    for path in checkpoints:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        assert_loads_strict(ckpt["state_dict"], prefix="model.")
        assert (
            ckpt["callbacks"]["RetrofitCallback"]["recipe"]["stochastic_depth"]["warmup"] == WARMUP
        )


@pytest.mark.skipif(not has_lightning, reason="the lightning extra is not installed")
def test_lightning_callback_strips_when_fit_fails():
    import lightning.pytorch as pl

    from retrofit.integrations.lightning import RetrofitCallback

    class Failing(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = TinyRes(num_classes=4)

        def training_step(self, batch, batch_idx):
            raise RuntimeError("boom")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    lit = Failing()
    x, y = images(16)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer = pl.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[RetrofitCallback(RECIPE, example_input=x[:2])],
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(lit, loader)
    assert_stripped(lit.model)


# ------------------------------------------------------------------ Hugging Face Trainer

has_hf = (
    importlib.util.find_spec("transformers") is not None
    and importlib.util.find_spec("accelerate") is not None
)


class HFWrapper(nn.Module):
    """What the HF Trainer expects: keyword inputs, a dict with the loss when labels are given."""

    def __init__(self):
        super().__init__()
        self.net = TinyRes(num_classes=4)

    def forward(self, pixel_values, labels=None):
        logits = self.net(pixel_values)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


@pytest.mark.skipif(not has_hf, reason="the hf extra (transformers, accelerate) is not installed")
def test_hf_trainer_callback_applies_schedules_logs_and_strips(tmp_path):
    from safetensors.torch import load_file
    from transformers import Trainer, TrainingArguments

    from retrofit.integrations.hf import RetrofitTrainerCallback

    torch.manual_seed(0)
    model = HFWrapper()
    x, y = images()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=8,
        learning_rate=0.05, logging_steps=1, save_steps=3, report_to=[], use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=DictDataset(x, y))
    callback = RetrofitTrainerCallback(RECIPE, module="net", example_input=x[:2]).attach(trainer)
    assert trainer.callback_handler.callbacks[0] is callback
    trainer.train()

    logs = [r for r in trainer.state.log_history if "retrofit/sd_survival" in r]
    # Logged at the end of step k (1-based): the rates that step k ran with, set at k − 1.
    survival = {r["step"] - 1: r["retrofit/sd_survival"] for r in logs}
    keep = {r["step"] - 1: r["retrofit/keep_prob"] for r in logs}
    assert_schedule_advanced(survival, keep)
    assert min(r["retrofit/sd_kept"] for r in logs) < 1.0, "gates dropped something"
    assert_stripped(model)
    for step in (3, 6):
        state = load_file(tmp_path / f"checkpoint-{step}" / "model.safetensors")
        assert_loads_strict(state, prefix="net.")


# ------------------------------------------------------------------ timm's train.py hook


def test_timm_train_py_hook_steps_regularizers_with_the_lr_schedule():
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    from retrofit.integrations.timm import scheduled

    torch.manual_seed(0)
    model = TinyRes(num_classes=4)
    x, y = images()
    # timm's train.py, in order: create_model, [hook 1], optimizer, scheduler, [hook 2], loop.
    model = retrofit.apply(model, RECIPE, example_input=x[:2])
    optimizer = create_optimizer_v2(model, opt="sgd", lr=0.05)
    updates_per_epoch = 3
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=2, updates_per_epoch=updates_per_epoch,
        step_on_epochs=False, warmup_epochs=0,
    )  # fmt: skip
    lr_scheduler = scheduled(
        lr_scheduler, model, num_epochs=num_epochs, updates_per_epoch=updates_per_epoch
    )
    gates = [m for m in model.modules() if isinstance(m, StochasticDepthGate)]
    blocks = [m for m in model.modules() if isinstance(m, DropBlock)]
    survival, keep, lrs = {}, {}, []
    num_updates = 0
    model.train()
    for epoch in range(num_epochs):
        for i in range(updates_per_epoch):  # train.py's train_one_epoch
            survival[num_updates] = sum(g.survival for g in gates) / len(gates)
            keep[num_updates] = sum(b.keep_prob for b in blocks) / len(blocks)
            xb, yb = x[i * 8 : i * 8 + 8], y[i * 8 : i * 8 + 8]
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
            optimizer.zero_grad()
            num_updates += 1
            lr_scheduler.step_update(num_updates=num_updates)
            lrs.append(optimizer.param_groups[0]["lr"])
        lr_scheduler.step(epoch + 1)
    assert_schedule_advanced(survival, keep)
    assert lrs[-1] < lrs[0], "the wrapped scheduler still drives the learning rate"
    assert lr_scheduler.state_dict() == lr_scheduler.scheduler.state_dict()
    assert_loads_strict(model.state_dict())  # what CheckpointSaver writes: the original keys
    retrofit.strip(model)  # before exporting the model itself
    assert_stripped(model)
