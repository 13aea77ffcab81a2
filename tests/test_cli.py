"""retrofit-cli run in-process: plan output, JSON contract, --out, exit codes, nothing half-written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from retrofit.cli import main

RECIPES = Path(__file__).parent.parent / "recipes"
SD = str(RECIPES / "sd.yaml")
TINY = "tests.user_models:tiny_resnet"


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch):
    # The factories are named tests.user_models:NAME: make that importable from any cwd.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent))


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _bad(capsys, *argv: str) -> str:
    """Exit 2 with one clear line on stderr and nothing on stdout."""
    code, out, err = _run(capsys, *argv)
    assert code == 2, (out, err)
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("retrofit-cli: error: "), err
    return lines[0]


def _nothing_written(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert [p.name for p in parent.iterdir() if p.name.startswith(".")] == []  # no temp dirs


# --- bad input: exit 2, nothing written -------------------------------------------------------


def test_no_recipe_no_command_is_a_helpful_error(capsys):
    line = _bad(capsys, "--model", "resnet18")
    assert "--recipe" in line and "lint" in line and "--stages" in line


def test_no_model(capsys):
    assert "--model" in _bad(capsys, "--recipe", SD)


def test_bad_flags_exit_2(capsys):
    code, _, err = _run(capsys, "--no-such-flag")
    assert code == 2 and "unrecognized" in err


def test_help_exits_0(capsys):
    code, out, _ = _run(capsys, "--help")
    assert code == 0 and "--recipe" in out
    code, out, _ = _run(capsys, "lint", "--help")
    assert code == 0 and "--measure" in out


def test_unknown_model(capsys, tmp_path):
    out = tmp_path / "out"
    line = _bad(capsys, "--model", "resnet5O", "--recipe", SD, "--out", str(out))
    assert "resnet5O" in line and "resnet50" in line
    _nothing_written(tmp_path, out)


def test_missing_recipe_file(capsys, tmp_path):
    out = tmp_path / "out"
    line = _bad(capsys, "--model", TINY, "--recipe", str(tmp_path / "nope.yaml"), "--out", str(out))
    assert "nope.yaml" in line
    _nothing_written(tmp_path, out)


@pytest.mark.parametrize(
    "body, field",
    [
        ({"stochastic_depth": {"p_L": 1.5}}, "stochastic_depth.p_L"),
        ({"stochastic_depth": {"p_l": 0.5}}, "stochastic_depth.p_l"),
        ({"stochastic_dept": {}}, "stochastic_dept"),
    ],
)
def test_bad_recipe(capsys, tmp_path, body, field):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump(body))
    out = tmp_path / "out"
    line = _bad(capsys, "--model", TINY, "--recipe", str(recipe), "--out", str(out))
    assert f"'{field}'" in line and "bad.yaml" in line
    _nothing_written(tmp_path, out)


def test_bad_recipe_keeps_the_did_you_mean(capsys, tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("stochastic_depth: {p_l: 0.5}\n")
    line = _bad(capsys, "--model", TINY, "--recipe", str(recipe))
    assert "typo.yaml" in line and "did you mean 'p_L'?" in line


def test_bad_model_kwargs(capsys, tmp_path):
    out = tmp_path / "out"
    line = _bad(
        capsys, "--model", TINY, "--model-kwargs", "nonsense", "--recipe", SD, "--out", str(out)
    )
    assert "--model-kwargs" in line
    line = _bad(capsys, "--model", "resnet18", "--model-kwargs", "foo=1", "--recipe", SD)
    assert "foo" in line
    _nothing_written(tmp_path, out)


def test_out_dir_not_empty_is_refused(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = _bad(capsys, "--model", TINY, "--recipe", SD, "--out", str(out))
    assert "not an empty directory" in line
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_train_flags_without_train(capsys):
    assert "--train" in _bad(capsys, "--model", TINY, "--recipe", SD, "--epochs", "2")
    assert "--train" in _bad(capsys, "--model", TINY, "--recipe", SD, "--data", "synthetic")


def test_missing_weights_file(capsys, tmp_path):
    out = tmp_path / "out"
    line = _bad(
        capsys,
        "--model",
        TINY,
        "--recipe",
        SD,
        "--weights",
        str(tmp_path / "w.pt"),
        "--out",
        str(out),
    )
    assert "w.pt" in line
    _nothing_written(tmp_path, out)


def test_bad_train_override_is_a_recipe_error(capsys):
    line = _bad(capsys, "--model", TINY, "--recipe", SD, "--train", "--epochs", "0")
    assert "train.epochs" in line


# --- planning ---------------------------------------------------------------------------------


def test_plan_table_says_which_zoo(capsys):
    code, out, err = _run(capsys, "--model", "resnet18", "--recipe", SD)
    assert code == 0, err
    first = out.splitlines()[0]
    assert "tv:resnet18" in first and "picked torchvision" in first and "timm:resnet18" in first
    rows = re.findall(r"^\s+(\d+)\s+\d\.\d{4}\s+layer", out, re.MULTILINE)
    assert rows == [str(d) for d in range(1, 9)]  # one row per block of resnet18, l = 1..8
    assert "layer1.0" in out


def test_json_contract(capsys):
    code, out, _ = _run(capsys, "--model", "resnet50", "--recipe", SD, "--json")
    assert code == 0
    d = json.loads(out)
    assert d["model"] == "resnet50" and d["source"] == "torchvision" and "picked" in d["note"]
    edits = d["edits"]
    assert len(edits) == 16
    first = edits[0]
    assert first["kind"] == "stochastic_depth" and first["module"] == "layer1.0"
    assert first["depth"] == 1 and first["survival"] == pytest.approx(1 - (1 / 16) * 0.5)
    assert "node" in first
    assert [e["depth"] for e in edits] == list(range(1, 17))
    assert edits[-1]["survival"] == pytest.approx(0.5)


def test_json_for_user_factory(capsys):
    code, out, _ = _run(
        capsys, "--model", TINY, "--model-kwargs", "depth=3", "--recipe", SD, "--json"
    )
    assert code == 0
    d = json.loads(out)
    assert d["model"] == TINY and d["source"] == "user" and d["kwargs"] == {"depth": 3}
    assert len(d["edits"]) == 3


# --- --out ------------------------------------------------------------------------------------


def test_out_writes_weights_recipe_and_plan(capsys, tmp_path):
    from safetensors.torch import load_file

    from tests.user_models import tiny_resnet

    out = tmp_path / "run" / "out"
    code, stdout, err = _run(capsys, "--model", TINY, "--recipe", SD, "--out", str(out))
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        "model.safetensors",
        "plan.json",
        "recipe.yaml",
    ]
    _nothing_written(out.parent, out.parent / "absent")  # no temp dir left beside it
    state = load_file(str(out / "model.safetensors"))
    fresh = tiny_resnet()
    assert set(state) == set(fresh.state_dict())  # same keys as the original class
    fresh.load_state_dict(state, strict=True)
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["stochastic_depth"]["p_L"] == 0.5 and recipe["train"]["epochs"] == 3
    plan = json.loads((out / "plan.json").read_text())
    assert plan["model"] == TINY and len(plan["edits"]) == 2
    assert "wrote" in stdout


def test_out_into_existing_empty_dir_and_json(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    code, stdout, _ = _run(capsys, "--model", TINY, "--recipe", SD, "--out", str(out), "--json")
    assert code == 0
    assert json.loads(stdout)["out"] == str(out)
    assert (out / "model.safetensors").is_file()


def test_out_with_weights(capsys, tmp_path):
    from safetensors.torch import load_file, save_file

    from tests.user_models import tiny_resnet

    src = tiny_resnet()
    for p in src.parameters():
        torch.nn.init.normal_(p)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    out = tmp_path / "out"
    args = ["--model", TINY, "--recipe", SD, "--weights", str(tmp_path / "w.safetensors")]
    code, _, err = _run(capsys, *args, "--out", str(out))
    assert code == 0, err
    state = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(state[k], v) for k, v in src.state_dict().items())


def test_failure_during_write_leaves_nothing(capsys, tmp_path, monkeypatch):
    import safetensors.torch

    def broken(*args, **kwargs):
        raise FileNotFoundError(2, "disk vanished", "model.safetensors")

    monkeypatch.setattr(safetensors.torch, "save", broken)
    out = tmp_path / "out"
    code, _, _ = _run(capsys, "--model", TINY, "--recipe", SD, "--out", str(out))
    assert code != 0
    _nothing_written(tmp_path, out)


# --- --stages, lint, --train (their engines land separately) ----------------------------------


def test_stages(capsys):
    code, out, _ = _run(capsys, "--model", "resnet50", "--stages")
    assert code == 0
    assert "layer1" in out and "layer4" in out
    code, out, _ = _run(capsys, "--model", "resnet50", "--stages", "--json")
    stages = json.loads(out)["stages"]
    assert [s["index"] for s in stages] == [1, 2, 3, 4]
    assert [s["reduction"] for s in stages] == [4, 8, 16, 32]


def test_stages_of_a_vit_is_a_clear_error(capsys):
    line = _bad(capsys, "--model", "vit_b_16", "--stages")
    assert "DropBlock does not apply" in line


def test_cutout_plan_says_the_trainer_applies_it(capsys):
    code, out, _ = _run(capsys, "--model", TINY, "--recipe", str(RECIPES / "cutout.yaml"))
    assert code == 0 and "is applied to each training batch by the trainer" in out


def test_uout_out_then_lint_is_clean(capsys, tmp_path):
    from safetensors.torch import load_file

    from tests.user_models import dropout_before_bn

    bug = "tests.user_models:dropout_before_bn"
    out = tmp_path / "out"
    code, _, err = _run(
        capsys, "--model", bug, "--recipe", str(RECIPES / "uout.yaml"), "--out", str(out)
    )
    assert code == 0, err
    plan = json.loads((out / "plan.json").read_text())
    assert [e["kind"] for e in plan["edits"]] == ["uout"]
    dropout_before_bn().load_state_dict(load_file(str(out / "model.safetensors")), strict=True)


def test_lint_measure(capsys):
    bug = "tests.user_models:dropout_before_bn"
    code, out, _ = _run(capsys, "lint", "--model", bug, "--measure", "--json")
    assert code == 1
    shifts = json.loads(out)["variance_shift"]
    assert len(shifts) == 1 and next(iter(shifts.values())) > 1.2  # Dropout(0.5): about 2
    assert "--measure" in _bad(capsys, "lint", "--model", bug, "--data", "synthetic")


def test_lint_clean_exits_0(capsys):
    code, out, _ = _run(capsys, "lint", "--model", TINY)
    assert code == 0 and "clean" in out


def test_lint_findings_exit_1(capsys):
    code, out, _ = _run(capsys, "lint", "--model", "tests.user_models:dropout_before_bn")
    assert code == 1
    code, out, _ = _run(capsys, "lint", "--model", "tests.user_models:dropout_before_bn", "--json")
    assert code == 1
    findings = json.loads(out)["findings"]
    assert len(findings) == 1 and {"dropout", "norm", "path", "source"} <= set(findings[0])


def test_lint_bad_input_exits_2(capsys):
    assert "--model" in _bad(capsys, "lint")
    assert "resnet50" in _bad(capsys, "lint", "--model", "resnet5O")


@pytest.mark.slow
def test_train_short_run(capsys, tmp_path):
    from safetensors.torch import load_file

    from tests.user_models import tiny_resnet

    recipe = tmp_path / "quick.yaml"
    recipe.write_text(
        "stochastic_depth: {}\n"
        "train: {epochs: 1, batch_size: 16, img_size: 32, warmup_epochs: 0, workers: 0}\n"
    )
    out = tmp_path / "run"
    code, stdout, err = _run(
        capsys,
        "--model", TINY, "--recipe", str(recipe), "--train", "--data", "synthetic:32",
        "--max-steps", "2", "--no-progress", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    assert "trained 2/2 steps" in stdout
    # The stripped weights load into the original class.
    tiny_resnet().load_state_dict(load_file(str(out / "model.safetensors")), strict=True)


def test_train_bad_data_exits_2(capsys, tmp_path):
    out = tmp_path / "run"
    line = _bad(
        capsys, "--model", TINY, "--recipe", SD, "--train", "--data", str(tmp_path / "nope"),
        "--no-progress", "--out", str(out),
    )  # fmt: skip
    assert "nope" in line
    _nothing_written(tmp_path, out)


def test_train_refuses_a_used_run_dir_without_resume(capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"")
    line = _bad(capsys, "--model", TINY, "--recipe", SD, "--train", "--out", str(out))
    assert "--resume" in line
    assert "--out" in _bad(capsys, "--model", TINY, "--recipe", SD, "--train", "--resume")
