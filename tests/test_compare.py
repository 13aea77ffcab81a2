"""``retrofit-cli compare`` end to end on tiny runs: the table, caching, resume, bad input, data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from retrofit.cli import main
from retrofit.train import loop

TINY = "tests.user_models:tiny_resnet"
# 5 images per class of the digits (50), 8 px, 2 epochs of 5 steps: a run takes about a second.
DATA = "digits:per_class=5"
TRAIN = ["--train-kwargs", "epochs=2", "batch_size=10", "img_size=8", "lr=3e-3"]


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent))


@pytest.fixture
def recipes(tmp_path) -> dict[str, Path]:
    d = tmp_path / "recipes"
    d.mkdir()
    files = {
        "none": "# baseline\n",
        "sd": "stochastic_depth: {p_L: 0.5, mode: row}\n",
        "wide": "model_kwargs: {width: 12}\n",
    }
    out = {}
    for name, body in files.items():
        (d / f"{name}.yaml").write_text(body)
        out[name] = d / f"{name}.yaml"
    return out


def _compare(capsys, *argv) -> tuple[int, str, str]:
    code = main(["compare", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _table(out: Path) -> dict:
    return json.loads((out / "table.json").read_text())


def test_compare_on_digits_writes_table_json_plot_and_caches(
    capsys, caplog, tmp_path, recipes, monkeypatch
):
    out = tmp_path / "cmp"
    argv = ["--model", TINY, "--recipes", recipes["none"], recipes["sd"], recipes["wide"],
            "--seeds", 2, "--data", DATA, *TRAIN, "--threads", 1, "--out", out]  # fmt: skip
    code, stdout, err = _compare(capsys, *argv)
    assert code == 0, err
    table = _table(out)
    assert [r["variant"] for r in table["rows"]] == ["none", "sd", "wide"]
    assert table["baseline"] == "none" and table["seeds"] == [0, 1]
    assert len(table["runs"]) == 6
    for rec in table["runs"]:
        run_dir = out / "runs" / rec["variant"] / f"seed{rec['seed']}"
        epochs = [
            json.loads(line)
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"epoch"' in line
        ]
        last = [r for r in epochs if r.get("kind") == "epoch"][-1]
        # Test accuracy is the trainer's own last evaluation; the gap is train − test.
        assert rec["test_acc"] == pytest.approx(last["val_top1"] / 100)
        assert 0 <= rec["train_acc"] <= 1 and rec["gap"] == pytest.approx(
            rec["train_acc"] - rec["test_acc"]
        )
        assert rec["train_samples"] == 50 and rec["epochs"] == 2 and rec["cpu_s"] > 0
        assert rec["recipe"]["train"]["seed"] == rec["seed"]
        assert (run_dir / "model.safetensors").is_file() and not (
            run_dir / "checkpoint.pt"
        ).exists()
    sd_runs = [r for r in table["runs"] if r["variant"] == "sd"]
    assert all(r["edits"] == 2 and r["edit_kinds"] == {"stochastic_depth": 2} for r in sd_runs)
    assert {r["model_kwargs"].get("width") for r in table["runs"] if r["variant"] == "wide"} == {12}
    # The two seeds are different runs (the seed reaches the weights and the data order).
    none = [r for r in table["runs"] if r["variant"] == "none"]
    assert none[0]["val_loss"] != none[1]["val_loss"]
    row = table["rows"][1]
    accs = [r["test_acc"] for r in sd_runs]
    assert row["test_acc"]["values"] == accs and row["test_acc"]["mean"] == pytest.approx(
        np.mean(accs)
    )
    md = (out / "table.md").read_text()
    assert md in stdout and "| `sd` | 2 | 2 |" in md and "Δ test vs `none`" in md
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Again: every run is finished, nothing trains, the same table comes out.
    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(loop, "fit", no_training)
    code, stdout2, _ = _compare(capsys, *argv)
    assert code == 0 and stdout2 == stdout
    # --report-only with one more seed: trains nothing, says what is missing, keeps the command.
    code, stdout3, err = _compare(capsys, *argv[:-4], "--seeds", 3, "--threads", 1, "--out", out,
                                  "--report-only")  # fmt: skip
    assert code == 0 and "6/9 runs finished" in err and stdout3 == stdout
    assert _table(out)["command"] == table["command"] and "--report-only" not in table["command"]
    # A changed recipe makes different runs: those, and only those, are redone.
    monkeypatch.undo()
    real, trained = loop.fit, []

    def counting(model, recipe, data, *, out, **kw):
        trained.append(Path(out).relative_to(out.parents[2]).as_posix())
        return real(model, recipe, data, out=out, **kw)

    monkeypatch.setattr(loop, "fit", counting)
    recipes["sd"].write_text("stochastic_depth: {p_L: 0.8, mode: row}\n")
    code, _, err = _compare(capsys, *argv)
    assert code == 0, err
    assert sorted(trained) == ["runs/sd/seed0", "runs/sd/seed1"]
    assert "sd seed 0: settings changed since it ran" in caplog.text
    table2 = _table(out)
    assert [
        r["recipe"]["stochastic_depth"]["p_L"] for r in table2["runs"] if r["variant"] == "sd"
    ] == [0.8, 0.8]
    assert [r for r in table2["runs"] if r["variant"] != "sd"] == [
        r for r in table["runs"] if r["variant"] != "sd"
    ]


def _interrupting_fit(victim: str, steps: int):
    """fit that stops the ``victim`` run after ``steps`` steps, as a SIGINT would."""
    real = loop.fit

    def fit(model, recipe, data, *, out, **kw):
        if Path(out).parent.name == victim and Path(out).name == "seed0" and not kw.get("resume"):
            kw["max_steps"] = steps
        return real(model, recipe, data, out=out, **kw)

    return fit


def test_resume_is_exact_and_a_broken_checkpoint_restarts(capsys, tmp_path, recipes, monkeypatch):
    base = ["--model", TINY, "--seeds", 1, "--data", DATA, *TRAIN, "--threads", 1]
    # Reference: the sd run, uninterrupted.
    ref_out = tmp_path / "ref"
    assert _compare(capsys, *base, "--recipes", recipes["sd"], "--out", ref_out)[0] == 0
    ref = _table(ref_out)["runs"][0]

    for broken in (False, True):
        out = tmp_path / f"cmp{int(broken)}"
        argv = [*base, "--recipes", recipes["none"], recipes["sd"], "--out", out]
        monkeypatch.setattr(loop, "fit", _interrupting_fit("sd", 3))
        code, _, err = _compare(capsys, *argv)
        monkeypatch.undo()
        assert code == 130 and "run the same command again" in err
        half = out / "runs" / "sd" / "seed0"
        assert (half / "checkpoint.pt").is_file() and not (half / "result.json").exists()
        assert [r["variant"] for r in _table(out)["runs"]] == ["none"]  # the table so far
        if broken:
            (half / "checkpoint.pt").write_bytes(b"not a checkpoint")
        code, _, err = _compare(capsys, *argv)
        assert code == 0, err
        rec = next(r for r in _table(out)["runs"] if r["variant"] == "sd")
        assert rec["resumed"] is (not broken)
        # Resumed or restarted, the run ends with the numbers of the uninterrupted one.
        for key in ("test_acc", "train_acc", "val_loss", "steps"):
            assert rec[key] == ref[key], key


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--recipes", "{none}", "{tmp}/missing.yaml"], "missing.yaml"),
        (["--recipes", "{none}", "{sd}", "--baseline", "nope"], "--baseline 'nope'"),
        (["--recipes", "{none}", "{tmp}/other/none.yaml"], "both named 'none'"),
        (["--recipes", "{none}", "--seeds", "0"], "--seeds 0"),
        (["--recipes", "{none}", "--model", "no_such_model_xyz"], "no_such_model_xyz"),
        (["--recipes", "{none}", "--data", "{tmp}/nowhere"], "nowhere"),
        (["--recipes", "{none}", "--data", "digits:classes=7"], "at least 2 classes"),
        (["--recipes", "{none}", "--train-kwargs", "epoch=3"], "train.epoch"),
        (["--recipes", "{none}", "--train-kwargs", "seed=3"], "--seeds"),
        (["--recipes", "{bad}"], "stochastic_depth.p_L"),
        (["--recipes", "{none}", "--weights", "{tmp}/w.safetensors"], "--weights"),
        (["--recipes", "{kw}"], "model_kwargs"),
        (["--recipes", "{none}", "--model-kwargs", "nonsense"], "--model-kwargs"),
        (["--recipes", "{none}", "--report-only"], "holds no comparison to report"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    capsys, tmp_path, recipes, args, needle
):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "none.yaml").write_text("")
    (tmp_path / "bad.yaml").write_text("stochastic_depth: {p_L: 1.5}\n")
    (tmp_path / "kw.yaml").write_text("model_kwargs: [1, 2]\n")
    subst = {"none": recipes["none"], "sd": recipes["sd"], "tmp": tmp_path,
             "bad": tmp_path / "bad.yaml", "kw": tmp_path / "kw.yaml"}  # fmt: skip
    args = [a.format(**subst) for a in args]
    if "--model" not in args:
        args = ["--model", TINY, *args]
    if "--data" not in args:
        args += ["--data", DATA]
    out = tmp_path / "out"
    code, stdout, err = _compare(capsys, *args, "--out", out)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("retrofit-cli compare: error: "), err
    assert needle in lines[0]
    assert stdout == "" and not out.exists()


def test_out_dir_of_something_else_is_refused(capsys, tmp_path, recipes):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, _, err = _compare(capsys, "--model", TINY, "--recipes", recipes["none"], "--out", out)
    assert code == 2 and "holds no comparison" in err
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def _image_folder(root: Path) -> Path:
    from PIL import Image

    from retrofit.train.data import load_digits_arrays

    pixels, labels = load_digits_arrays()
    for split, n in (("train", 8), ("val", 4)):
        for c in (0, 1):
            d = root / split / f"digit{c}"
            d.mkdir(parents=True)
            of_class = np.flatnonzero(labels == c)
            for i in of_class[:n] if split == "train" else of_class[-n:]:
                img = (pixels[i].reshape(8, 8) * 255 / 16).astype(np.uint8)
                Image.fromarray(img).resize((16, 16)).save(d / f"{i}.png")
    return root


def test_compare_on_an_image_folder(capsys, tmp_path, recipes):
    data = _image_folder(tmp_path / "folder")
    out = tmp_path / "cmp"
    code, stdout, err = _compare(
        capsys, "--model", TINY, "--recipes", recipes["none"], recipes["sd"], "--seeds", 2,
        "--data", data, "--train-kwargs", "epochs=1", "batch_size=4", "img_size=16", "workers=0",
        "--out", out, "--baseline", "sd",
    )  # fmt: skip
    assert code == 0, err
    table = _table(out)
    assert table["baseline"] == "sd" and [r["n"] for r in table["rows"]] == [2, 2]
    for rec in table["runs"]:
        assert rec["train_samples"] == 16 and rec["val_samples"] == 8
        assert "ImageFolder" in rec["data"]
        # Train accuracy on 16 images and test accuracy on 8 are multiples of 1/16 and 1/8.
        assert rec["train_acc"] * 16 == pytest.approx(round(rec["train_acc"] * 16))
        assert rec["test_acc"] * 8 == pytest.approx(round(rec["test_acc"] * 8))
    assert "vs_baseline" in table["rows"][0] and not math.isnan(
        table["rows"][0]["test_acc"]["mean"]
    )


def test_recipes_that_train_differently_are_named_in_a_warning(capsys, tmp_path):
    from retrofit.compare.command import _warn_unequal_training
    from retrofit.compare.variants import load_variants

    (tmp_path / "a.yaml").write_text("train: {epochs: 3, lr: 1.0e-3}\n")
    (tmp_path / "b.yaml").write_text("cutout: {n_holes: 1, length: 4}\n")
    _warn_unequal_training(load_variants([str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")], {}))
    err = capsys.readouterr().err
    assert (
        "train differently (epochs: a=3, b=10)" in err and "lr" not in err
    )  # lr 1e-3 is the default
    # --train-kwargs makes them equal: no warning.
    _warn_unequal_training(
        load_variants([str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")], {"epochs": 3})
    )
    assert capsys.readouterr().err == ""
