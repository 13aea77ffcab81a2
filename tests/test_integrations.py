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
import logging
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import retrofit
from retrofit.layers import DropBlock, StochasticDepthGate
from retrofit.rewrite.execute import is_retrofitted
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


# ------------------------------------------------------------------ what the integrations report
# (issue 19, item 6 and item 5's HF part): the plan summary and lint verdict once, the CLI's
# figures (sd_kept against sd_planned, sd_survival, keep_prob) per log step or epoch, per-block
# rates on request, nothing of retrofit's on evaluation records.

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "retrofit"


def planned_mean(model: nn.Module) -> float:
    edits = retrofit.plan(model, RECIPE).by_kind("stochastic_depth")
    return sum(e.survival for e in edits) / len(edits)


def test_the_lifecycle_is_written_once():
    """The trainer and the three integrations drive retrofit.lifecycle; none of them applies,
    schedules, resets counters or strips on its own, and none imports the trainer's modules
    (issue 20: the core, the lifecycle with it, never imports retrofit.train)."""
    import ast

    users = [LIBRARY / "train" / "loop.py", *sorted((LIBRARY / "integrations").glob("*.py"))]
    own_steps = {
        "retrofit.api": {"apply"},
        "retrofit.rewrite.execute": {"strip"},
        "retrofit.schedule": {"update", "current_rates", "summary"},
    }
    for path in users:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in own_steps:
                names = {a.name for a in node.names} & own_steps[node.module]
                assert not names, f"{path.name} imports {names} from {node.module}"
            if isinstance(node, ast.Attribute) and node.attr in ("reset_stats", "update"):
                base = node.value
                assert not (isinstance(base, ast.Name) and base.id == "schedule"), path.name
                assert node.attr != "reset_stats", f"{path.name} resets counters itself"
        assert "lifecycle" in path.read_text(), f"{path.name} does not use retrofit.lifecycle"
    for path in [LIBRARY / "lifecycle.py", *sorted((LIBRARY / "integrations").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom | ast.Import):
                mods = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                mods += [a.name for a in node.names] if isinstance(node, ast.Import) else []
                assert not any(m.startswith("retrofit.train") for m in mods), path.name


class Messages(logging.Handler):
    """Collects the messages of one logger (Lightning's does not propagate to the root)."""

    def __init__(self, name: str):
        super().__init__(logging.INFO)
        self.name_, self.lines = name, []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def __enter__(self):
        logger = logging.getLogger(self.name_)
        self.level, logger.level = logger.level, logging.INFO
        logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        logger = logging.getLogger(self.name_)
        logger.removeHandler(self)
        logger.setLevel(self.level)


def assert_announced_once(lines: list[str], plan_summary: str) -> None:
    plan = [line for line in lines if line.startswith("retrofit plan: ")]
    lint = [line for line in lines if line.startswith("retrofit lint: ")]
    assert plan == [f"retrofit plan: {plan_summary}"], lines
    assert len(lint) == 1 and "clean" in lint[0], lines  # TinyRes's Dropout is after the last BN


def assert_per_block(values: dict[str, float], gates: list[str], t: float) -> None:
    """Every gate's own survival at progress t (warm-up of the linear rule), and the logged
    mean is the mean of the per-block values."""
    targets = block_survivals(["b1", "b2", "b3", "b4"], 0.5, "linear")
    for name, p in zip(gates, targets.values(), strict=True):
        assert values[f"retrofit/{name}/survival"] == pytest.approx(warmed_up(t, p, WARMUP))
        assert 0.0 <= values[f"retrofit/{name}/kept_fraction"] <= 1.0
    mean = sum(values[f"retrofit/{n}/survival"] for n in gates) / len(gates)
    assert values["retrofit/sd_survival"] == pytest.approx(mean)


@pytest.mark.skipif(not has_lightning, reason="the lightning extra is not installed")
def test_lightning_callback_reports_plan_lint_and_per_block_rates(tmp_path):
    import lightning.pytorch as pl
    import yaml
    from lightning.pytorch.loggers import CSVLogger

    from retrofit.integrations.lightning import RetrofitCallback

    class Lit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = TinyRes(num_classes=4)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.model(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", F.cross_entropy(self.model(batch[0]), batch[1]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    torch.manual_seed(0)
    lit = Lit()
    x, y = images(48)
    data = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    callback = RetrofitCallback(RECIPE, example_input=x[:2], per_block=True)
    per_step: dict[int, dict[str, tuple[float, float]]] = {}  # step → gate → (kept, calls)

    def counters() -> dict[str, tuple[float, float]]:
        rates = retrofit.schedule.current_rates(lit.model)
        return {
            n: (r["kept"] if "kept" in r else r["kept_fraction"] * r["calls"], r["calls"])
            for n, r in rates.items()
            if "calls" in r
        }

    class Window(pl.Callback):
        """Each step's own kept/calls per gate, read around the step (before RetrofitCallback's
        batch end, which may restart the counters)."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before = counters()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            after = counters()
            per_step[trainer.global_step - 1] = {
                n: (after[n][0] - self.before[n][0], after[n][1] - self.before[n][1]) for n in after
            }

    def window_kept(last: int, steps: int) -> float:
        """Mean over gates of the kept fraction over steps last − steps + 1 … last."""
        gates = per_step[last]
        fractions = [
            sum(per_step[s][n][0] for s in range(last - steps + 1, last + 1))
            / sum(per_step[s][n][1] for s in range(last - steps + 1, last + 1))
            for n in gates
        ]
        return sum(fractions) / len(fractions)

    trainer = pl.Trainer(
        max_steps=STEPS, accelerator="cpu", logger=CSVLogger(tmp_path, name="run"),
        log_every_n_steps=2, val_check_interval=3, limit_val_batches=1,
        callbacks=[Window(), callback],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        num_sanity_val_steps=0,
    )  # fmt: skip
    with Messages("lightning.pytorch") as messages:
        trainer.fit(lit, loader, torch.utils.data.DataLoader(data, batch_size=8))

    summary = callback.lifecycle.started.plan_summary
    assert summary.startswith("TinyRes: 4 stochastic_depth, 2 dropblock"), summary
    assert_announced_once(messages.lines, summary)
    log_dir = Path(trainer.logger.log_dir)
    hparams = yaml.safe_load((log_dir / "hparams.yaml").read_text())
    assert hparams["retrofit/plan"] == summary
    assert hparams["retrofit/lint"].startswith("clean") and hparams["retrofit/lint_findings"] == 0

    rows = list(csv.DictReader((log_dir / "metrics.csv").open()))
    train_rows = [r for r in rows if r.get("retrofit/sd_survival")]
    assert sorted(int(r["step"]) for r in train_rows) == [1, 3, 5]  # every 2nd step
    planned = planned_mean(TinyRes(num_classes=4))
    for r in train_rows:
        values = {k: float(v) for k, v in r.items() if k.startswith("retrofit/") and v}
        assert_per_block(values, callback_gate_names(callback), int(r["step"]) / STEPS)
        assert values["retrofit/sd_planned"] == pytest.approx(planned)
        # The logged kept fraction covers the 2 steps since the previous logged one.
        assert values["retrofit/sd_kept"] == pytest.approx(window_kept(int(r["step"]), 2))
    val_rows = [r for r in rows if r.get("val_loss")]
    assert len(val_rows) == 2, "validated at steps 3 and 6"
    assert not any(v for r in val_rows for k, v in r.items() if k.startswith("retrofit/"))
    assert_stripped(lit.model)


def callback_gate_names(callback) -> list[str]:
    """The gates' names in execution order, from the last report (the model is stripped)."""
    names = [n for n, v in callback.last_report.blocks.items() if "kept_fraction" in v]
    assert len(names) == 4, names
    return names


@pytest.mark.skipif(not has_lightning, reason="the lightning extra is not installed")
def test_lightning_module_without_forward_gets_one_line_naming_module():
    import lightning.pytorch as pl

    from retrofit.integrations.lightning import RetrofitCallback

    class NoForward(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = TinyRes(num_classes=4)
            self.loss = nn.CrossEntropyLoss()

        def training_step(self, batch, batch_idx):
            return self.loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    lit = NoForward()
    x, y = images(16)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer = pl.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[RetrofitCallback(RECIPE, example_input=x[:2])],
    )  # fmt: skip
    with pytest.raises(ValueError) as err:
        trainer.fit(lit, loader)
    message = str(err.value)
    assert "\n" not in message and len(message) < 240, message
    assert "module='net'" in message and "net, loss" in message, message
    assert not is_retrofitted(lit)


@pytest.mark.skipif(not has_hf, reason="the hf extra (transformers, accelerate) is not installed")
def test_hf_trainer_callback_reports_once_and_keeps_eval_logs_clean(tmp_path, capsys):
    from transformers import Trainer, TrainingArguments

    from retrofit.integrations.hf import RetrofitTrainerCallback

    torch.manual_seed(0)
    model = HFWrapper()
    x, y = images(48)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=8,
        per_device_eval_batch_size=16, learning_rate=0.05, logging_steps=1, eval_strategy="steps",
        eval_steps=3, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    data = DictDataset(x, y)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    callback = RetrofitTrainerCallback(
        RECIPE, module="net", example_input=x[:2], per_block=True
    ).attach(trainer)
    trainer.train()

    history = trainer.state.log_history
    evals = [r for r in history if "eval_loss" in r]
    final = [r for r in history if "train_runtime" in r]
    assert len(evals) == 2 and len(final) == 1
    for r in evals + final:  # eval and end-of-training records: no training statistics
        assert not [k for k in r if k.startswith("retrofit/")], r
    summary = callback.lifecycle.started.plan_summary
    assert summary.startswith("TinyRes: 4 stochastic_depth, 2 dropblock"), summary
    assert_announced_once(capsys.readouterr().out.splitlines(), summary)
    train = [r for r in history if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    planned = planned_mean(TinyRes(num_classes=4))
    for r in train:
        assert_per_block(r, callback_gate_names(callback), (r["step"] - 1) / STEPS)
        assert r["retrofit/sd_planned"] == pytest.approx(planned)


@pytest.mark.skipif(not has_hf, reason="the hf extra (transformers, accelerate) is not installed")
@pytest.mark.xfail(
    not hasattr(retrofit.schedule, "reset_stats"),  # the fix's own entry point
    strict=True,
    reason="gates at survival 1.0 count no calls (issue 19 item 5): fixed at the source in "
    "retrofit.schedule / the gate counters by the compile branch, not merged here yet",
)
def test_hf_logged_kept_is_one_while_every_gate_survives(tmp_path):
    """The first step of a warm-up runs every gate at survival 1.0: all branches are kept, so
    the logged kept fraction (mean and per block) is 1.0, not 0.0."""
    from transformers import Trainer, TrainingArguments

    from retrofit.integrations.hf import RetrofitTrainerCallback

    torch.manual_seed(0)
    model = HFWrapper()
    x, y = images(16)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8, learning_rate=0.05,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=DictDataset(x, y))
    RetrofitTrainerCallback(RECIPE, module="net", example_input=x[:2], per_block=True).attach(
        trainer
    )
    trainer.train()
    (first,) = [r for r in trainer.state.log_history if "loss" in r]
    assert first["retrofit/sd_survival"] == 1.0
    kept = {k: v for k, v in first.items() if k.endswith("kept_fraction") or k.endswith("sd_kept")}
    assert len(kept) == 5 and set(kept.values()) == {1.0}, kept


# ------------------------------------------------------------------ timm's train.py, as it runs


def readme_timm_lines() -> list[str]:
    """The statements of the README's timm block (hook lines 1, 2 and 3), as source."""
    import ast
    import re

    text = (ROOT / "README.md").read_text()
    block = re.search(r"timm's `train.py`, two lines.*?```python\n(.*?)```", text, re.S)
    assert block, "README has no timm train.py block"
    tree = ast.parse(block.group(1))
    return [ast.get_source_segment(block.group(1), s) for s in tree.body]


def test_timm_train_py_with_the_readme_lines_logs_and_writes_summary_csv(
    tmp_path, caplog, monkeypatch
):
    """timm's train.py, step by step with timm's own pieces: ``create_model``, [README line 1],
    ``create_optimizer_v2``, ``create_scheduler_v2``, [line 2], then per epoch the loop shape of
    its ``train_one_epoch`` (forward, backward, ``optimizer.step``, ``step_update`` after each
    update), [line 3] on the dict it returns, its ``validate`` dict, ``timm.utils.update_summary``
    to ``summary.csv``, ``lr_scheduler.step(epoch + 1)``. (train.py itself is not in timm's
    wheel, so it cannot be imported here.)"""
    import timm
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import accuracy, update_summary

    import retrofit.integrations.timm

    monkeypatch.chdir(ROOT)  # the README's recipe path is relative to the repository
    line1, line2, line3 = readme_timm_lines()
    assert "retrofit.apply" in line1 and "scheduled(" in line2 and "retrofit_metrics" in line3
    torch.manual_seed(0)
    x, y = images(48)
    x = F.interpolate(x, size=32)
    ns = {"retrofit": retrofit, "model": timm.create_model("resnet10t", num_classes=4)}
    exec(line1, ns)
    model = ns["model"]
    optimizer = create_optimizer_v2(model, opt="sgd", lr=0.05)
    num_epochs, updates_per_epoch = 2, 3
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=num_epochs, updates_per_epoch=updates_per_epoch,
        warmup_epochs=0,
    )  # fmt: skip
    ns.update(lr_scheduler=lr_scheduler, num_epochs=num_epochs, updates_per_epoch=updates_per_epoch)
    with caplog.at_level(logging.INFO, logger="retrofit.integrations.timm"):
        exec(line2, ns)
        lr_scheduler = ns["lr_scheduler"]
        csv_path = tmp_path / "summary.csv"
        expected_kept = []
        for epoch in range(num_epochs):
            model.train()  # train_one_epoch
            losses, num_updates = [], epoch * updates_per_epoch
            for i in range(updates_per_epoch):
                loss = F.cross_entropy(model(x[i * 8 : i * 8 + 8]), y[i * 8 : i * 8 + 8])
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses.append(loss.item())
                num_updates += 1
                lr_scheduler.step_update(num_updates=num_updates, metric=sum(losses) / len(losses))
            ns["train_metrics"] = OrderedDict([("loss", sum(losses) / len(losses))])
            expected_kept.append(
                retrofit.schedule.summary(retrofit.schedule.current_rates(model))["sd_kept"]
            )
            exec(line3, ns)
            model.eval()  # validate
            with torch.no_grad():
                out = model(x[24:40])
            top1, top5 = accuracy(out, y[24:40], topk=(1, 4))
            eval_metrics = OrderedDict(
                [("loss", F.cross_entropy(out, y[24:40]).item()), ("top1", top1.item())]
            )
            lrs = [g["lr"] for g in optimizer.param_groups]
            update_summary(
                epoch, ns["train_metrics"], eval_metrics, filename=str(csv_path),
                lr=sum(lrs) / len(lrs), write_header=epoch == 0,
            )  # fmt: skip
            lr_scheduler.step(epoch + 1, eval_metrics["top1"])
    lines = [r.getMessage() for r in caplog.records if r.name == "retrofit.integrations.timm"]
    summary = lr_scheduler.lifecycle.started.plan_summary
    assert summary.startswith("ResNet: 4 stochastic_depth"), summary
    assert lines[0] == f"retrofit plan: {summary}" and lines[1].startswith("retrofit lint: clean")

    rows = list(csv.DictReader(csv_path.open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    columns = set(rows[0])
    assert {"train_sd_kept", "train_sd_planned", "train_sd_survival"} <= columns
    assert not [c for c in columns if c.startswith("eval_sd") or c.startswith("eval_keep")]
    planned = (0.875 + 0.75 + 0.625 + 0.5) / 4  # recipes/sd.yaml: linear rule, p_L 0.5, L = 4
    for epoch, r in enumerate(rows):
        kept = float(r["train_sd_kept"])
        assert kept == pytest.approx(expected_kept[epoch]), "the epoch's window, not a shorter one"
        assert float(r["train_sd_planned"]) == pytest.approx(planned)
        assert float(r["train_sd_survival"]) == pytest.approx(planned)  # no warm-up in sd.yaml
        assert lines[2 + epoch] == (
            f"retrofit: epoch {epoch}: kept {kept:.2f} (planned {planned:.2f}), "
            f"survival {planned:.2f}"
        )
    assert len(lines) == 2 + num_epochs
