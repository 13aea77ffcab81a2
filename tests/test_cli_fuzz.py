"""Malformed input against the CLI and the API: one line naming the thing, the right exit code.

Every case asserts the CLI's contract for bad input (README, "Failure behaviour"): exit 2 (3 for
a refused model), exactly one line on stderr that names the field or flag, no traceback, nothing
on stdout, and nothing written: the fixture tree (``--out`` targets, recipes, files) is compared
before and after. The listed cases cover flags, model names, factories, kwargs, paths, data,
devices and recipes; ``hypothesis`` then generates recipe values for every numeric field of the
schema, through :func:`retrofit.load_recipe` and through the command line.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import retrofit
from retrofit.cli import main
from retrofit.errors import ModelError, RecipeError

TINY = "tests.user_models:tiny_resnet"
PKG = "hh_fuzz_pkg"  # a user package written by the fixture: factories that fail in every way
ERROR_LINE = re.compile(r"^retrofit-cli( lint)?: error: \S")
INT64_MAX = 2**63 - 1

RECIPES = {
    "ok": {
        "stochastic_depth": {"p_L": 0.5},
        "train": {"epochs": 1, "batch_size": 16, "img_size": 16, "workers": 0},
    },
    "lr_inf": "train: {lr: .inf}\n",
    "weight_decay_inf": "train: {weight_decay: inf}\n",
    "seed_2_70": "train: {seed: 1180591620717411303424}\n",
    "sd_seed_2_63": "stochastic_depth: {seed: 9223372036854775808}\n",
    "p_L_nan": "stochastic_depth: {p_L: .nan}\n",
    "keep_prob_inf": "dropblock: {keep_prob: .inf}\n",
    "block_size_neg": "dropblock: {block_size: -1}\n",
    "clip_grad_inf": "train: {clip_grad: .inf}\n",
    "warmup_nan": "train: {warmup_epochs: .nan}\n",
    "momentum_neg": "train: {momentum: -0.1}\n",
    "epochs_float": "train: {epochs: 2.5}\n",
    "beta_big": "uout: {beta: 1.0e+300}\n",
    "length_str": "cutout: {length: '16'}\n",
    "bad_yaml": "stochastic_depth: {p_L: [\n",
    "python_tag": "!!python/object/apply:os.system ['echo pwned']\n",
    "a_list": "- 1\n- 2\n",
    "typo": "stochastic_dept: {}\n",
}

# (id, argv with {placeholders}, exit code, substrings the error line must contain)
CASES = [
    # flags
    ("no-args", [], 2, ["--model"]),
    ("no-recipe", ["--model", TINY], 2, ["--recipe"]),
    ("no-model", ["--recipe", "{r:ok}"], 2, ["--model"]),
    ("unknown-flag", ["--bogus-flag"], 2, ["--bogus-flag"]),
    ("flag-missing-value", ["--model"], 2, ["--model"]),
    ("train-only-flag", ["--model", TINY, "--recipe", "{r:ok}", "--epochs", "3"], 2, ["--epochs"]),
    ("seed-2-70", ["{train}", "--seed", str(2**70)], 2, ["--seed", "2**63-1"]),
    ("seed-negative", ["{train}", "--seed", "-1"], 2, ["--seed"]),
    ("seed-not-int", ["{train}", "--seed", "abc"], 2, ["--seed"]),
    ("max-steps-negative", ["{train}", "--max-steps", "-1"], 2, ["--max-steps"]),
    ("max-steps-float", ["{train}", "--max-steps", "1.5"], 2, ["--max-steps"]),
    ("lr-inf", ["{train}", "--lr", "inf"], 2, ["--lr", "finite"]),
    ("lr-nan", ["{train}", "--lr", "nan"], 2, ["--lr"]),
    ("lr-negative", ["{train}", "--lr", "-1"], 2, ["--lr"]),
    ("lr-zero", ["{train}", "--lr", "0"], 2, ["--lr"]),
    ("epochs-zero", ["{train}", "--epochs", "0"], 2, ["--epochs"]),
    ("epochs-2-70", ["{train}", "--epochs", str(2**70)], 2, ["--epochs"]),
    ("batch-size-zero", ["{train}", "--batch-size", "0"], 2, ["--batch-size"]),
    ("batch-size-huge", ["{train}", "--batch-size", "100000"], 2, ["batch_size"]),
    ("device-bogus", ["{train}", "--device", "bogus"], 2, ["'bogus'", "allowed here: cpu"]),
    ("device-meta", ["{train}", "--device", "meta"], 2, ["'meta'"]),
    ("device-cuda-99", ["{train}", "--device", "cuda:99"], 2, ["'cuda:99'"]),
    (
        "resume-without-out",
        ["--model", TINY, "--recipe", "{r:ok}", "--train", "--resume"],
        2,
        ["--resume", "--out"],
    ),  # fmt: skip
    (
        "weights-and-pretrained",
        ["{train}", "--weights", "{garbage}", "--pretrained"],
        2,
        ["--pretrained", "--weights"],
    ),  # fmt: skip
    ("weights-missing", ["{train}", "--weights", "{tmp}/nope.pt"], 2, ["--weights", "nope.pt"]),
    ("weights-garbage", ["{train}", "--weights", "{garbage}"], 2, ["garbage.pt"]),
    ("stages-with-train", ["--model", TINY, "--stages", "--train"], 2, ["--stages"]),
    # model names and factories
    (
        "model-unknown",
        ["--model", "no_such_model_xyz", "--recipe", "{r:ok}"],
        2,
        ["no_such_model_xyz"],
    ),  # fmt: skip
    ("model-tv-unknown", ["--model", "tv:resnet_nope", "--recipe", "{r:ok}"], 2, ["resnet_nope"]),
    ("model-timm-unknown", ["--model", "timm:vit_nope", "--recipe", "{r:ok}"], 2, ["vit_nope"]),
    ("model-bad-colons", ["--model", "a b:c:d", "--recipe", "{r:ok}"], 2, ["a b:c:d"]),
    (
        "factory-raises-runtime",
        ["--model", f"{PKG}.raises:runtime", "--recipe", "{r:ok}"],
        2,
        [f"{PKG}.raises:runtime", "RuntimeError", "boom"],
    ),  # fmt: skip
    (
        "factory-raises-keyerror",
        ["--model", f"{PKG}.raises:keyerror", "--recipe", "{r:ok}"],
        2,
        ["KeyError", "'backbone'"],
    ),  # fmt: skip
    (
        "factory-syntax-error",
        ["--model", f"{PKG}.syntax:build", "--recipe", "{r:ok}"],
        2,
        [f"{PKG}.syntax", "SyntaxError"],
    ),  # fmt: skip
    (
        "factory-import-fails",
        ["--model", f"{PKG}.importfail:build", "--recipe", "{r:ok}"],
        2,
        [f"{PKG}.importfail", "ImportError", "needs a GPU library"],
    ),  # fmt: skip
    (
        "factory-module-missing",
        ["--model", f"{PKG}.nomodule:build", "--recipe", "{r:ok}"],
        2,
        [f"{PKG}.nomodule"],
    ),  # fmt: skip
    (
        "factory-attr-missing",
        ["--model", f"{PKG}.raises:nothing_here", "--recipe", "{r:ok}"],
        2,
        ["nothing_here"],
    ),  # fmt: skip
    (
        "factory-not-callable",
        ["--model", "tests.user_models:NOT_CALLABLE", "--recipe", "{r:ok}"],
        2,
        ["not callable"],
    ),  # fmt: skip
    (
        "factory-returns-str",
        ["--model", "tests.user_models:not_a_module", "--recipe", "{r:ok}"],
        2,
        ["not a torch.nn.Module"],
    ),  # fmt: skip
    (
        "factory-raises-in-train",
        ["--model", f"{PKG}.raises:runtime", "--recipe", "{r:ok}", "--train", "--out", "{new}"],
        2,
        ["RuntimeError"],
    ),  # fmt: skip
    # --model-kwargs
    (
        "kwargs-num-classes-neg",
        ["--model", "resnet18", "--model-kwargs", "num_classes=-1", "--recipe", "{r:ok}"],
        2,
        ["num_classes=-1"],
    ),  # fmt: skip
    (
        "kwargs-num-classes-float",
        ["--model", TINY, "--model-kwargs", "num_classes=1.5", "--recipe", "{r:ok}"],
        2,
        ["num_classes"],
    ),  # fmt: skip
    (
        "kwargs-num-classes-bool",
        ["--model", TINY, "--model-kwargs", "num_classes=true", "--recipe", "{r:ok}"],
        2,
        ["num_classes"],
    ),  # fmt: skip
    (
        "kwargs-in-chans-zero",
        ["--model", TINY, "--model-kwargs", "in_chans=0", "--recipe", "{r:ok}"],
        2,
        ["in_chans"],
    ),  # fmt: skip
    (
        "kwargs-drop-rate-2",
        ["--model", "timm:resnet18", "--model-kwargs", "drop_rate=2", "--recipe", "{r:ok}"],
        2,
        ["drop_rate"],
    ),  # fmt: skip
    (
        "kwargs-inf",
        ["--model", TINY, "--model-kwargs", "width=1e999", "--recipe", "{r:ok}"],
        2,
        ["width", "finite"],
    ),  # fmt: skip
    (
        "kwargs-no-equals",
        ["--model", TINY, "--model-kwargs", "width", "--recipe", "{r:ok}"],
        2,
        ["--model-kwargs", "'width'"],
    ),  # fmt: skip
    (
        "kwargs-bad-key",
        ["--model", TINY, "--model-kwargs", "1x=3", "--recipe", "{r:ok}"],
        2,
        ["'1x=3'"],
    ),  # fmt: skip
    (
        "kwargs-twice",
        ["--model", TINY, "--model-kwargs", "width=4", "width=8", "--recipe", "{r:ok}"],
        2,
        ["width", "twice"],
    ),  # fmt: skip
    (
        "kwargs-unknown",
        ["--model", TINY, "--model-kwargs", "bogus_kw=1", "--recipe", "{r:ok}"],
        2,
        ["bogus_kw"],
    ),  # fmt: skip
    (
        "kwargs-negative-width",
        ["--model", TINY, "--model-kwargs", "width=-3", "--recipe", "{r:ok}"],
        2,
        ["width", "-3"],
    ),  # fmt: skip
    (
        "kwargs-vit-negative-depth",
        [
            "--model",
            "timm:vit_tiny_patch16_224",
            "--model-kwargs",
            "depth=-1",
            "--recipe",
            "{r:ok}",
        ],
        2,
        ["depth"],
    ),  # fmt: skip
    # lint
    ("lint-no-model", ["lint"], 2, ["--model"]),
    (
        "lint-data-without-measure",
        ["lint", "--model", TINY, "--data", "{tmp}"],
        2,
        ["--data", "--measure"],
    ),  # fmt: skip
    (
        "lint-measure-data-missing",
        ["lint", "--model", TINY, "--measure", "--data", "{tmp}/nonexistent"],
        2,
        ["nonexistent"],
    ),  # fmt: skip
    (
        "lint-kwargs-num-classes-neg",
        ["lint", "--model", "resnet18", "--model-kwargs", "num_classes=-1"],
        2,
        ["num_classes"],
    ),  # fmt: skip
    ("lint-factory-raises", ["lint", "--model", f"{PKG}.raises:runtime"], 2, ["RuntimeError"]),
    # recipes
    ("recipe-missing", ["--model", TINY, "--recipe", "{tmp}/none.yaml"], 2, ["none.yaml"]),
    ("recipe-is-dir", ["--model", TINY, "--recipe", "{tmp}"], 2, ["recipe"]),
    ("recipe-lr-inf", ["--model", TINY, "--recipe", "{r:lr_inf}"], 2, ["train.lr", "finite"]),
    (
        "recipe-weight-decay-inf",
        ["--model", TINY, "--recipe", "{r:weight_decay_inf}"],
        2,
        ["train.weight_decay"],
    ),  # fmt: skip
    ("recipe-seed-2-70", ["{train:seed_2_70}"], 2, ["train.seed", "2**63-1"]),
    (
        "recipe-sd-seed-2-63",
        ["--model", TINY, "--recipe", "{r:sd_seed_2_63}"],
        2,
        ["stochastic_depth.seed"],
    ),  # fmt: skip
    ("recipe-p_L-nan", ["--model", TINY, "--recipe", "{r:p_L_nan}"], 2, ["stochastic_depth.p_L"]),
    (
        "recipe-keep-prob-inf",
        ["--model", TINY, "--recipe", "{r:keep_prob_inf}"],
        2,
        ["dropblock.keep_prob"],
    ),  # fmt: skip
    (
        "recipe-block-size-neg",
        ["--model", TINY, "--recipe", "{r:block_size_neg}"],
        2,
        ["dropblock.block_size"],
    ),  # fmt: skip
    (
        "recipe-clip-grad-inf",
        ["--model", TINY, "--recipe", "{r:clip_grad_inf}"],
        2,
        ["train.clip_grad"],
    ),  # fmt: skip
    (
        "recipe-warmup-nan",
        ["--model", TINY, "--recipe", "{r:warmup_nan}"],
        2,
        ["train.warmup_epochs"],
    ),  # fmt: skip
    (
        "recipe-momentum-neg",
        ["--model", TINY, "--recipe", "{r:momentum_neg}"],
        2,
        ["train.momentum"],
    ),  # fmt: skip
    (
        "recipe-epochs-float",
        ["--model", TINY, "--recipe", "{r:epochs_float}"],
        2,
        ["train.epochs"],
    ),  # fmt: skip
    ("recipe-beta-huge", ["--model", TINY, "--recipe", "{r:beta_big}"], 2, ["uout.beta"]),
    (
        "recipe-length-quoted",
        ["--model", TINY, "--recipe", "{r:length_str}"],
        2,
        ["cutout.length", "without quotes"],
    ),  # fmt: skip
    ("recipe-bad-yaml", ["--model", TINY, "--recipe", "{r:bad_yaml}"], 2, ["YAML", "line"]),
    ("recipe-python-tag", ["--model", TINY, "--recipe", "{r:python_tag}"], 2, ["YAML"]),
    ("recipe-a-list", ["--model", TINY, "--recipe", "{r:a_list}"], 2, ["list"]),
    (
        "recipe-typo",
        ["--model", TINY, "--recipe", "{r:typo}"],
        2,
        ["stochastic_dept", "did you mean 'stochastic_depth'"],
    ),  # fmt: skip
    # paths: --out, --data
    (
        "out-parent-is-file",
        ["--model", TINY, "--recipe", "{r:ok}", "--out", "{afile}/sub"],
        2,
        ["afile", "is a file"],
    ),  # fmt: skip
    (
        "out-is-file",
        ["--model", TINY, "--recipe", "{r:ok}", "--out", "{afile}"],
        2,
        ["afile", "is a file"],
    ),  # fmt: skip
    (
        "out-is-file-resume",
        ["{train}", "--out", "{afile}", "--resume"],
        2,
        ["afile", "is a file", "--resume"],
    ),  # fmt: skip
    ("out-parent-is-file-train", ["{train}", "--out", "{afile}/run"], 2, ["afile"]),
    (
        "out-not-empty",
        ["--model", TINY, "--recipe", "{r:ok}", "--out", "{full}"],
        2,
        ["not an empty directory"],
    ),  # fmt: skip
    ("out-not-empty-train", ["{train}", "--out", "{full}"], 2, ["not an empty directory"]),
    (
        "data-missing",
        ["{train}", "--out", "{new}", "--data", "{tmp}/nodata"],
        2,
        ["--data", "nodata"],
    ),  # fmt: skip
    ("data-is-file", ["{train}", "--out", "{new}", "--data", "{afile}"], 2, ["--data", "afile"]),
    (
        "data-synthetic-zero",
        ["{train}", "--out", "{new}", "--data", "synthetic:0"],
        2,
        ["synthetic:0"],
    ),  # fmt: skip
    ("data-empty-dir", ["{train}", "--out", "{new}", "--data", "{emptydir}"], 2, ["--data"]),
]
if torch.cuda.is_available():  # the machine has a GPU: --device cuda is valid there
    CASES.append(("device-cuda-999", ["{train}", "--device", "cuda:999"], 2, ["'cuda:999'"]))
else:
    CASES.append(("device-cuda", ["{train}", "--device", "cuda"], 2, ["'cuda'", "CUDA"]))


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under ``root`` with its size and mtime: "nothing written"."""
    return {
        str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Fixture files (under ``root``, compared before/after) and a user package (elsewhere)."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "afile").write_text("not a directory\n")
    (root / "garbage.pt").write_bytes(b"this is not a checkpoint")
    (root / "full").mkdir()
    (root / "full" / "keep.txt").write_text("a previous run's file\n")
    (root / "emptydir").mkdir()
    for name, body in RECIPES.items():
        text = yaml.safe_dump(body) if isinstance(body, dict) else body
        (root / f"{name}.yaml").write_text(text)
    pkgs = tmp_path_factory.mktemp("pkgs")
    pkg = pkgs / PKG
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "raises.py").write_text(
        "def runtime(**kw):\n    raise RuntimeError('boom')\n\n"
        "def keyerror(**kw):\n    return {}['backbone']\n"
    )
    (pkg / "syntax.py").write_text("def build(:\n    pass\n")
    (pkg / "importfail.py").write_text("raise ImportError('needs a GPU library')\n")
    return root, pkgs


@pytest.fixture(autouse=True)
def _no_bytecode(monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", True)


def _expand(argv: list[str], root: Path) -> list[str]:
    out = []
    for a in argv:
        if a == "{train}":
            out += ["--model", TINY, "--recipe", str(root / "ok.yaml"), "--train", "--no-progress"]
            continue
        m = re.fullmatch(r"\{train:(\w+)\}", a)
        if m:
            out += ["--model", TINY, "--recipe", str(root / f"{m[1]}.yaml"), "--train"]
            continue
        a = re.sub(r"\{r:(\w+)\}", lambda m: str(root / f"{m[1]}.yaml"), a)
        for key, value in {
            "{tmp}": root,
            "{afile}": root / "afile",
            "{garbage}": root / "garbage.pt",
            "{full}": root / "full",
            "{new}": root / "new-run",
            "{emptydir}": root / "emptydir",
        }.items():
            a = a.replace(key, str(value))
        out.append(a)
    return out


def _assert_one_line(code: int, out: str, err: str, expected: int, needles: list[str]) -> str:
    assert code == expected, (code, out, err)
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert ERROR_LINE.match(lines[0]), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize("argv,code,needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_cli_input_is_one_line_and_writes_nothing(
    world, monkeypatch, capsys, argv, code, needles
):
    root, pkgs = world
    monkeypatch.syspath_prepend(str(pkgs))
    before = _tree(root)
    got = main(_expand(argv, root))
    out, err = capsys.readouterr()
    _assert_one_line(got, out, err, code, needles)
    assert _tree(root) == before
    assert not (root / "new-run").exists()


def test_the_fuzz_covers_at_least_60_inputs():
    assert len(CASES) >= 60


# --- the API side of the same inputs ---------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"num_classes": -1}, "num_classes=-1"),
        ({"num_classes": 2**40}, "num_classes"),
        ({"in_chans": 0}, "in_chans"),
        ({"drop_path_rate": 1.5}, "drop_path_rate"),
        ({"drop_rate": float("nan")}, "drop_rate"),
        ({"width": float("inf")}, "finite"),
        ({"width": (8, float("-inf"))}, "finite"),
    ],
)
def test_create_model_refuses_bad_kwargs_before_building(kwargs, needle):
    from retrofit.models import create_model

    with pytest.raises(ModelError, match=re.escape(needle)):
        create_model(TINY, kwargs=kwargs)


def test_user_factory_failures_are_model_errors(world, monkeypatch):
    from retrofit.models import create_model

    monkeypatch.syspath_prepend(str(world[1]))
    for spec, needle in [
        (f"{PKG}.raises:runtime", "RuntimeError: boom"),
        (f"{PKG}.raises:keyerror", "KeyError: 'backbone'"),
        (f"{PKG}.syntax:build", "SyntaxError"),
        (f"{PKG}.importfail:build", "ImportError: needs a GPU library"),
    ]:
        for meta in (False, True):
            with pytest.raises(ModelError, match=re.escape(needle)):
                create_model(spec, meta=meta)


@pytest.mark.parametrize("device", ["bogus", "meta", "cuda:99", "mps:7", ""])
def test_check_device_names_the_device_and_what_exists(device):
    from retrofit.train.distributed import DeviceError, check_device

    with pytest.raises(DeviceError) as e:
        check_device(device)
    assert repr(device) in str(e.value) and "allowed here: cpu" in str(e.value)
    assert check_device("cpu") == torch.device("cpu")


def test_fit_refuses_a_bad_device_and_max_steps_before_writing(tmp_path):
    from retrofit.train import fit
    from retrofit.train.distributed import DeviceError
    from tests.user_models import tiny_resnet

    out = tmp_path / "run"
    with pytest.raises(DeviceError, match="'bogus'"):
        fit(tiny_resnet(), None, None, out=out, device="bogus", progress=False)
    with pytest.raises(ValueError, match="max_steps"):
        fit(tiny_resnet(), None, "synthetic:64", out=out, device="cpu", max_steps=-1)
    assert not out.exists()


def test_lint_measure_reads_the_data_even_without_findings(tmp_path, capsys):
    from retrofit.lint import measure_variance_shift
    from tests.user_models import tiny_resnet

    assert measure_variance_shift(tiny_resnet()) == {}  # nothing to measure, no data named: fine
    missing = str(tmp_path / "nonexistent")
    assert main(["lint", "--model", TINY, "--measure", "--data", missing]) == 2
    assert "nonexistent" in capsys.readouterr().err


# --- recipes, generated -----------------------------------------------------------------------

# What the recipe documentation allows for every number in the schema: (section, key) →
# (low, high, low_open, high_open, integer, null_allowed). The loaded value must lie there.
SCHEMA = {
    ("stochastic_depth", "p_L"): (0, 1, True, False, False, False),
    ("stochastic_depth", "seed"): (0, INT64_MAX, False, False, True, True),
    ("dropblock", "block_size"): (1, INT64_MAX, False, False, True, False),
    ("dropblock", "keep_prob"): (0, 1, True, False, False, False),
    ("dropblock", "ramp"): (0, 1, True, False, False, False),
    ("uout", "beta"): (0, 1, True, False, False, False),
    ("cutout", "n_holes"): (0, INT64_MAX, False, False, True, False),
    ("cutout", "length"): (1, INT64_MAX, False, False, True, False),
    ("train", "epochs"): (1, INT64_MAX, False, False, True, False),
    ("train", "batch_size"): (1, INT64_MAX, False, False, True, False),
    ("train", "grad_accum"): (1, INT64_MAX, False, False, True, False),
    ("train", "log_every"): (1, INT64_MAX, False, False, True, False),
    ("train", "seed"): (0, INT64_MAX, False, False, True, False),
    ("train", "workers"): (0, INT64_MAX, False, False, True, True),  # null: what the machine has
    ("train", "checkpoint_every"): (0, INT64_MAX, False, False, True, False),
    ("train", "img_size"): (8, INT64_MAX, False, False, True, True),
    ("train", "lr"): (0, math.inf, True, True, False, False),
    ("train", "weight_decay"): (0, math.inf, False, True, False, False),
    ("train", "momentum"): (0, math.inf, False, True, False, False),
    ("train", "warmup_lr"): (0, math.inf, False, True, False, False),
    ("train", "min_lr"): (0, math.inf, False, True, False, False),
    ("train", "warmup_epochs"): (0, 10, False, True, False, True),  # < epochs (default 10)
    ("train", "clip_grad"): (0, math.inf, True, True, False, True),
    ("train", "label_smoothing"): (0, 1, False, True, False, False),
    ("train", "ema_decay"): (0, 1, True, True, False, False),
    ("train", "val_fraction"): (0, 1, True, True, False, False),
}
FIELDS = sorted(SCHEMA)

numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 2**63 - 1, 2**63, -1, 0.5, 1.0, float("inf"), float("nan")]),
)
anything = st.one_of(
    numbers,
    st.booleans(),
    st.none(),
    st.text(max_size=6),
    st.lists(st.integers(min_value=-3, max_value=3), max_size=2),
)
# Refused for every field: non-finite numbers (also spelled as strings), a bool for a number.
non_finite = st.sampled_from(
    [float("inf"), float("-inf"), float("nan"), "inf", "-inf", "nan", True]
)
# Refused for every integer field: beyond int64 (seeds, sizes and counts become int64 tensors).
beyond_64_bit = st.sampled_from([2**63, 2**64, 2**70, -(2**70)])
INT_FIELDS = [f for f in FIELDS if SCHEMA[f][4]]


@st.composite
def never_valid(draw: st.DrawFn) -> tuple[tuple[str, str], object]:
    if draw(st.booleans()):
        return draw(st.sampled_from(INT_FIELDS)), draw(beyond_64_bit)
    return draw(st.sampled_from(FIELDS)), draw(non_finite)


# DropBlock fields that take one value per stage as a list (issue 15).
PER_STAGE = {("dropblock", "block_size"), ("dropblock", "gamma_scale")}


def _in_schema(field: tuple[str, str], value: object) -> bool:
    low, high, low_open, high_open, integer, null_ok = SCHEMA[field]
    if isinstance(value, tuple) and field in PER_STAGE:  # one value per stage
        return bool(value) and all(_in_schema(field, v) for v in value)
    if field == ("cutout", "length") and isinstance(value, float):
        return 0.0 < value <= 1.0  # a fraction of the image side (issue 15)
    if value is None:
        return null_ok
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if integer and not isinstance(value, int):
        return False
    if not math.isfinite(value):
        return False
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    return above and below


def _load(field: tuple[str, str], value: object) -> object:
    section, key = field
    recipe = retrofit.load_recipe({section: {key: value}})
    loaded = getattr(recipe, section)
    return getattr(loaded, key)


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(FIELDS), value=anything)
def test_every_recipe_number_is_either_in_range_or_an_error_naming_its_field(field, value):
    dotted = ".".join(field)
    try:
        loaded = _load(field, value)
    except RecipeError as e:
        # A per-stage list names the bad element: dropblock.block_size[1]
        assert e.field == dotted or e.field.startswith(dotted + "["), (e.field, dotted)
        assert f"'{e.field}'" in str(e)
        assert "allowed" in str(e) and "\n" not in str(e)
        return
    assert _in_schema(field, loaded), (dotted, value, loaded)


@settings(max_examples=150, deadline=None)
@given(case=never_valid())
def test_non_finite_and_beyond_64_bit_numbers_are_refused_everywhere(case):
    field, value = case
    with pytest.raises(RecipeError) as e:
        _load(field, value)
    assert e.value.field == ".".join(field)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=never_valid())
def test_generated_bad_recipes_through_the_cli(case, monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    (section, key), value = case
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        recipe = root / "recipe.yaml"
        recipe.write_text(yaml.safe_dump({section: {key: value}}))
        before = _tree(root)
        out, err = io.StringIO(), io.StringIO()
        argv = ["--model", TINY, "--recipe", str(recipe), "--train", "--out", str(root / "run")]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
        _assert_one_line(code, out.getvalue(), err.getvalue(), 2, [f"{section}.{key}", "allowed"])
        assert _tree(root) == before
