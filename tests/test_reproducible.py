"""A training run is a function of its seed: the initial weights of a model built from scratch too.

torch seeds its default generator at random in every process (2.x), so a model built before the
trainer seeds anything gets different weights per process. The tests disturb the global generator
between two runs, as a new process would.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from retrofit.cli import main

TINY = "tests.user_models:tiny_resnet"


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent))


def _train(tmp_path: Path, name: str, *extra: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(int.from_bytes(name.encode(), "little") % 2**31)  # another "process"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train: {epochs: 1, batch_size: 16, img_size: 8, lr: 3.0e-3}\n")
    out = tmp_path / name
    argv = ["--model", TINY, "--recipe", str(recipe), "--train", "--data", "digits:per_class=8",
            "--out", str(out), "--no-progress", *extra]  # fmt: skip
    assert main(argv) == 0
    return load_file(str(out / "model.safetensors"))


def test_cli_training_from_scratch_is_a_function_of_the_seed(tmp_path, capsys):
    a, b = _train(tmp_path, "a"), _train(tmp_path, "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = _train(tmp_path, "c", "--seed", "1")
    assert not torch.equal(a["stem.0.weight"], c["stem.0.weight"])
