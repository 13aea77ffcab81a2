"""A user's day with retrofit-cli (issue 14): instant help, visible training, reachable settings,
readable lint and plan output, plots, and nothing left behind by a refused run."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from retrofit.cli import SUBCOMMANDS, main

ROOT = Path(__file__).resolve().parent.parent
TINY = "tests.user_models:tiny_resnet"
BUG = "tests.user_models:dropout_before_bn"


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- instant help: no torch before the work starts --------------------------------------------

_PROBE = """
import sys
from retrofit.cli import main
code = main({argv!r})
heavy = sorted(m for m in ("torch", "torchvision", "timm", "numpy") if m in sys.modules)
print("EXIT", code, "HEAVY", ",".join(heavy) or "-")
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["lint", "--help"],
        ["models", "--help"],
        ["recipes", "--help"],
        ["--no-such-flag"],  # argparse error
        ["--recipe", "recipes/sd.yaml"],  # no --model
        ["--model", "resnet18", "--recipe", "sd", "--epochs", "2"],  # --epochs without --train
        ["--model", "resnet18", "--recipe", "nope.yaml", "--train"],  # no such recipe
        ["lint"],  # no --model
    ],
)
def test_help_and_argument_errors_do_not_import_torch(argv):
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE.format(argv=argv)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    last = proc.stdout.strip().splitlines()[-1]
    expected = 0 if "--help" in argv else 2
    assert last == f"EXIT {expected} HEAVY -", proc.stdout + proc.stderr


def test_import_retrofit_is_lazy_and_names_stay_functions():
    code = (
        "import sys, retrofit\n"
        "assert 'torch' not in sys.modules\n"
        "from retrofit.lint import format_report\n"  # binds the submodule on the package
        "import retrofit.plan\n"
        "assert callable(retrofit.lint) and callable(retrofit.plan), (retrofit.lint, retrofit.plan)\n"
        "assert retrofit.schedule.__name__ == 'retrofit.schedule'\n"
        "print('ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert proc.stdout.strip() == "ok", proc.stderr


def test_a_subcommand_is_one_table_entry():
    assert {"lint", "models", "recipes"} <= set(SUBCOMMANDS)
    for name, command in SUBCOMMANDS.items():
        assert command.parser().prog == f"retrofit-cli {name}"


# --- models, recipes --------------------------------------------------------------------------


def test_models_lists_both_zoos_with_a_pattern(capsys):
    code, out, _ = _run(capsys, "models", "resnet1*")
    assert code == 0
    assert "# torchvision: " in out and "# timm: " in out
    names = [ln for ln in out.splitlines() if not ln.startswith("#")]
    assert "resnet18" in names and "resnet101" in names and "resnet50" not in names
    code, out, _ = _run(capsys, "models", "--json", "ResNet18")  # substring, any case
    zoos = json.loads(out)
    assert "resnet18" in zoos["torchvision"] and "resnet18d" in zoos["timm"]
    if "transformers" in zoos:  # installed: its model types are listed too
        _, out, _ = _run(capsys, "models", "--json", "vit")
        assert "vit" in json.loads(out)["transformers"]
    code, _, err = _run(capsys, "models", "no-such-architecture-anywhere")
    assert code == 2 and "no model name matches" in err


def test_recipes_lists_every_shipped_card(capsys):
    code, out, _ = _run(capsys, "recipes")
    assert code == 0
    shipped = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
    listed = [ln.split()[0] for ln in out.splitlines() if not ln.startswith("#")]
    assert listed == shipped
    assert "sd " in out and "stochastic_depth {p_L: 0.5" in out and "(Huang et al. 2016)" in out
    code, out, _ = _run(capsys, "recipes", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["dropblock"]["techniques"]["dropblock"]["keep_prob"] == 0.9


def test_recipe_by_name_and_a_missing_file_names_the_choices(capsys):
    code, out, _ = _run(capsys, "--model", TINY, "--recipe", "sd")
    assert code == 0 and "stochastic depth" in out
    code, out, err = _run(capsys, "--model", TINY, "--recipe", "nope.yaml")
    assert code == 2 and out == ""
    assert "--recipe 'nope.yaml': no such file; shipped recipes: " in err and "sd_batch" in err
    assert "recipe field" not in err


# --- flags that override the recipe's train: section ------------------------------------------

OVERRIDES = [
    ("--epochs", "7", "epochs", 7),
    ("--batch-size", "16", "batch_size", 16),
    ("--lr", "0.02", "lr", 0.02),
    ("--opt", "sgd", "opt", "sgd"),
    ("--weight-decay", "0.0", "weight_decay", 0.0),
    ("--warmup-epochs", "1.5", "warmup_epochs", 1.5),
    ("--label-smoothing", "0.0", "label_smoothing", 0.0),
    ("--ema", None, "ema", True),
    ("--amp", "off", "amp", "off"),
    ("--img-size", "48", "img_size", 48),
    ("--workers", "1", "workers", 1),
    ("--seed", "5", "seed", 5),
]


@pytest.mark.parametrize("flag, value, key, expected", OVERRIDES)
def test_every_training_flag_overrides_the_recipe(capsys, tmp_path, flag, value, key, expected):
    recipe = tmp_path / "r.yaml"
    # The recipe sets a different value for every key, so the flag must win over it.
    base = {"epochs": 3, "batch_size": 64, "lr": 1e-3, "opt": "adamw", "weight_decay": 0.05,
            "warmup_epochs": 0.5, "label_smoothing": 0.1, "ema": False, "amp": "auto",
            "img_size": 32, "workers": 0, "seed": 0}  # fmt: skip
    assert base[key] != expected
    recipe.write_text(yaml.safe_dump({"stochastic_depth": {}, "train": base}))
    args = [flag] if value is None else [flag, value]
    code, out, err = _run(
        capsys, "--model", TINY, "--recipe", str(recipe), "--print-config", "--json", *args
    )
    assert code == 0, err
    train = json.loads(out)["recipe"]["train"]
    assert train[key] == expected
    # Everything else is the recipe's.
    assert all(train[k] == v for k, v in base.items() if k not in (key, "workers"))


def test_print_config_is_a_loadable_recipe(capsys, tmp_path):
    code, out, _ = _run(capsys, "--model", "resnet18", "--recipe", "sd", "--print-config",
                        "--epochs", "2", "--no-ema")  # fmt: skip
    assert code == 0
    assert out.startswith("# resolved settings") and "# model: tv:resnet18" in out
    path = tmp_path / "resolved.yaml"
    path.write_text(out)
    import retrofit

    recipe = retrofit.load_recipe(path)
    assert recipe.train.epochs == 2 and recipe.train.ema is False
    assert recipe.stochastic_depth.p_L == 0.5


def test_a_bad_override_names_the_flag(capsys):
    code, _, err = _run(capsys, "--model", TINY, "--recipe", "sd", "--train", "--opt", "adamx")
    assert code == 2 and "train.opt" in err and "--opt" in err and "did you mean" in err


def test_workers_default_to_the_machine_and_never_exceed_it():
    from retrofit.finetune_config import (
        MAX_AUTO_WORKERS,
        TrainConfig,
        available_cpus,
        resolve_workers,
    )

    cpus = available_cpus()
    assert TrainConfig().workers is None
    assert resolve_workers(None) == min(cpus, MAX_AUTO_WORKERS)
    assert resolve_workers(10 * cpus) == cpus
    assert resolve_workers(0) == 0
    assert resolve_workers(None, processes_per_node=2 * cpus) == 0


# --- training reports -------------------------------------------------------------------------

QUICK = "stochastic_depth: {p_L: 0.8}\ntrain: {epochs: 2, batch_size: 16, img_size: 16, warmup_epochs: 0, log_every: 2}\n"


def _train(capsys, tmp_path, *extra: str) -> tuple[int, str, str, Path]:
    recipe = tmp_path / "quick.yaml"
    recipe.write_text(QUICK)
    out = tmp_path / "run"
    code, stdout, err = _run(
        capsys, "--model", TINY, "--recipe", str(recipe), "--train", "--data", "synthetic:64",
        "--out", str(out), *extra,
    )  # fmt: skip
    return code, stdout, err, out


def test_training_prints_the_plan_the_lint_a_line_per_epoch_and_a_summary(capsys, tmp_path):
    code, out, err, run = _train(capsys, tmp_path, "--label-smoothing", "0", "--opt", "sgd")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("model: tests.user_models:tiny_resnet")
    assert lines[1].startswith("plan: TinyResNet: 2 stochastic_depth")
    assert lines[2] == "lint: clean: no active dropout in the graph"
    assert any(ln.startswith("train: 2 epochs × 4 steps, 16 images/step, sgd") for ln in lines)
    epochs = [ln for ln in lines if ln.startswith("epoch ")]
    assert [ln.split(":")[0] for ln in epochs] == ["epoch 1/2", "epoch 2/2"]
    for ln in epochs:
        for part in ("loss ", "top-1 ", "top-5 ", "lr ", " img/s", "kept ", "(planned 0.85)",
                     "saved checkpoint.pt"):  # fmt: skip
            assert part in ln, (part, ln)
    assert lines[-2].startswith("trained 8/8 steps (2/2 epochs) in ")
    assert lines[-1].startswith(f"weights: {run / 'model.safetensors'}")
    # The records the lines were made from: the epoch's kept fraction, and the flags took effect.
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["kind"] == "epoch"][-1]
    assert 0.5 < last["sd_kept"] < 1.0 and last["images_per_s"] > 0
    train = yaml.safe_load((run / "recipe.yaml").read_text())["train"]
    assert train["opt"] == "sgd" and train["label_smoothing"] == 0.0


def test_log_json_is_one_object_per_line(capsys, tmp_path):
    code, out, err, run = _train(capsys, tmp_path, "--log-json")
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "result"
    assert kinds.count("epoch") == 2 and kinds.count("step") == 4  # log_every 2, 8 steps
    assert events[0]["plan"].startswith("TinyResNet") and events[0]["lint_findings"] == 0
    assert events[-1]["completed"] and events[-1]["weights"] == str(run / "model.safetensors")


def test_quiet_prints_only_the_summary(capsys, tmp_path):
    code, out, err, _ = _train(capsys, tmp_path, "--quiet")
    assert code == 0, err
    assert out.splitlines()[0].startswith("trained 8/8 steps")
    assert not any(ln.startswith(("epoch ", "plan:", "lint:")) for ln in out.splitlines())


def test_strict_lint_refusal_leaves_out_absent(capsys, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = _run(
        capsys, "--model", BUG, "--recipe", "cutout", "--train", "--strict-lint",
        "--data", "synthetic:32", "--img-size", "16", "--batch-size", "8", "--out", str(out),
    )  # fmt: skip
    assert code == 1 and "strict lint: 1 finding(s)" in err
    assert not out.exists()
    # The natural retry, with a recipe that fixes it, uses the same --out.
    fix = tmp_path / "fix.yaml"
    fix.write_text("uout: {beta: 0.1}\ntrain: {epochs: 1, batch_size: 16, warmup_epochs: 0}\n")
    code, stdout, err = _run(
        capsys, "--model", BUG, "--recipe", str(fix), "--train", "--strict-lint",
        "--data", "synthetic:32", "--img-size", "16", "--batch-size", "8", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    assert "lint: clean" in stdout and (out / "model.safetensors").is_file()


# --- lint output ------------------------------------------------------------------------------


def test_lint_summary_first_on_densenet121(capsys):
    code, out, _ = _run(capsys, "lint", "--model", "densenet121", "--model-kwargs",
                        "drop_rate=0.2", "--max", "0")  # fmt: skip
    assert code == 1
    lines = out.splitlines()
    assert lines[1].startswith("58 dropout(s) reach 58 BatchNorm(s) (535 finding(s)")
    group = lines[2]
    assert "58 × F.dropout (p=0.2) in _DenseLayer" in group and "(BatchNorm2d)" in group
    assert "fix: recipe uout:" in group
    assert len(lines) <= 8 and "details" not in out
    code, out, _ = _run(capsys, "lint", "--model", "densenet121", "--model-kwargs",
                        "drop_rate=0.2", "--max", "2")  # fmt: skip
    assert "details: 2 of 58 dropout(s) (--max N for more" in out
    assert out.count("reaches ") == 2 and len(out.splitlines()) < 40


def test_lint_names_the_classes_of_sequential_members(capsys):
    code, out, _ = _run(capsys, "lint", "--model", BUG)
    assert code == 1
    assert "1 (Dropout)  [Dropout, p=0.5, in the model (Sequential)]" in out
    assert "→ 3 (BatchNorm2d)" in out and "path: 1 (Dropout) → 2 (Conv2d) → 3 (BatchNorm2d)" in out
    assert "(?)" not in out


# --- plan tables, stages ----------------------------------------------------------------------


def test_plan_tables_have_each_techniques_columns(capsys):
    code, out, _ = _run(capsys, "--model", "resnet50", "--recipe", "dropblock")
    assert code == 0
    header = next(ln for ln in out.splitlines() if ln.strip().startswith("stage"))
    assert header.split()[:4] == ["stage", "after", "block_size", "keep_prob"]
    rows = [ln.split() for ln in out.splitlines() if ln.strip().startswith(("3 ", "4 "))]
    assert [r[:4] for r in rows[:2]] == [
        ["3", "layer3.0", "7", "0.9"],
        ["3", "layer3.1", "7", "0.9"],
    ]
    assert len(rows) == 9 and "<root>" not in out and "p_l / params" not in out
    code, out, _ = _run(capsys, "--model", "resnet18", "--recipe", "sd")
    header = next(ln for ln in out.splitlines() if ln.strip().startswith("l "))
    assert header.split()[:4] == ["l", "p_l", "block", "action"]
    assert "  8  0.5000  layer4.1  gate on the branch" in out


def test_cutout_plan_is_one_line(capsys):
    code, out, _ = _run(capsys, "--model", TINY, "--recipe", "cutout")
    assert code == 0
    lines = out.splitlines()
    assert sum("n_holes=1, length=16" in ln for ln in lines) == 1
    assert not any(ln.strip().startswith(("kind", "---")) for ln in lines)


def test_stages_at_another_image_size(capsys):
    code, out, _ = _run(capsys, "--model", "resnet50", "--stages", "--img-size", "64")
    assert code == 0 and "for a 3×64×64 input" in out and "1×2048×2×2" in out
    code, out, _ = _run(capsys, "--model", "resnet50", "--stages", "--json", "--img-size", "96")
    stages = json.loads(out)["stages"]
    assert [s["shape"][2] for s in stages] == [24, 12, 6, 3]


# --- files ------------------------------------------------------------------------------------


def test_out_respects_the_umask(capsys, tmp_path):
    previous = os.umask(0o022)
    try:
        out = tmp_path / "out"
        code, _, err = _run(capsys, "--model", TINY, "--recipe", "sd", "--out", str(out))
    finally:
        os.umask(previous)
    assert code == 0, err
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {
        "model.safetensors": 0o644,
        "recipe.yaml": 0o644,
        "plan.json": 0o644,
    }


def test_gitignore_covers_the_readme_examples():
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "runs/" in ignored and "/out/" in ignored


# --- plots ------------------------------------------------------------------------------------


def _png_size(path: Path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_plots_show_every_block_and_fit_a_laptop_screen(tmp_path):
    from retrofit.train.plots import _sd_rows, plot_curves, plot_survival

    gates = {f"layer{i}.retrofit_stochastic_depth0": 1.0 - 0.1 * i for i in range(1, 5)}
    # Depth order comes from the layers, not from the record's key order.
    layers = {n: {"kind": "stochastic_depth", "depth": i, "survival": p}
              for i, (n, p) in enumerate(gates.items(), start=1)}  # fmt: skip
    steps = [
        {"kind": "step", "step": s, "epoch": s / 10, "loss": 2.0 - s / 10, "lr": 1e-3,
         "images_per_s": 100.0,
         "rates": {n: {"kept_fraction": p} for n, p in reversed(list(gates.items()))}}
        for s in range(2, 21, 2)
    ]  # fmt: skip
    epochs = [{"kind": "epoch", "step": 10 * e, "epoch": e, "train_loss": 1.0, "val_loss": 1.1,
               "val_top1": 80.0, "val_top5": 99.0} for e in (1, 2)]  # fmt: skip
    rows = _sd_rows(steps, layers)
    assert [r["label"] for r in rows] == [f"{i}  layer{i}" for i in range(1, 5)]
    assert rows[3]["series"] == [pytest.approx(0.6)] * 10 and rows[3]["planned"] == pytest.approx(
        0.6
    )
    curves = plot_curves(steps + epochs, tmp_path / "curves.png", layers=layers)
    w, h = _png_size(curves)
    assert w <= 1100 and 500 <= h <= 750
    plan = {"edits": [{"kind": "stochastic_depth", "depth": i, "survival": p, "block": f"layer{i}"}
                      for i, p in enumerate(gates.values(), start=1)]}  # fmt: skip
    w, h = _png_size(plot_survival(plan, tmp_path / "survival.png", records=steps, layers=layers))
    assert w <= 1100 and h <= 750


def test_epoch_line_and_summary_grammar():
    from retrofit.train.console import epoch_line, finish_lines

    rec = {"epoch": 1, "train_loss": 0.5, "val_loss": 0.6, "val_top1": 90.0, "val_top5": 99.5,
           "lr": 1e-3, "images_per_s": 812.0, "sd_kept": 0.8, "sd_planned": 0.81,
           "epoch_time": 75.0, "eval_time": 2.0, "checkpoint": "checkpoint.pt"}  # fmt: skip
    line = epoch_line(rec, epochs=1)
    assert line == (
        "epoch 1/1: loss 0.5000 (val 0.6000), top-1 90.00%, top-5 99.50%, lr 1.00e-03, "
        "812 img/s, kept 0.80 (planned 0.81), 1 min 15 s + 2.0 s eval, saved checkpoint.pt"
    )
    summary = {"step": 3, "total_steps": 3, "epoch": 1, "epochs": 1, "seconds": 4.0,
               "metrics": {}, "num_classes": 10}  # fmt: skip
    assert finish_lines(summary)[0] == "trained 3/3 steps (1/1 epochs) in 4.0 s"


def test_progress_lines_without_a_terminal_are_throttled():
    import io

    from retrofit.train.console import Console

    stream = io.StringIO()
    console = Console("text", stream=stream, progress_every_s=0.0)
    assert not console.bars  # StringIO is no terminal
    rec = {"step": 10, "epoch": 0.5, "loss": 1.25, "lr": 1e-3, "images_per_s": 99.6}
    console.step(rec, None, epochs=3, total_steps=60)
    assert (
        stream.getvalue() == "  step 10/60 (17%, epoch 1/3): loss 1.2500, lr 1.00e-03, 100 img/s\n"
    )
    console.progress_every_s = 3600.0
    console.step(rec, None, epochs=3, total_steps=60)
    assert stream.getvalue().count("\n") == 1  # too soon after the last line
