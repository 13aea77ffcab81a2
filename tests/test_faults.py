"""Faults around a training run: full disk, kill -9, signals, concurrent runs, reproducibility.

What README's "Failure behaviour" promises, each tested here: a write the disk refuses is exit 2
with one line and the previous checkpoint intact; temp files of killed writes are removed at the
next start; SIGINT/SIGTERM save, say how to resume and exit 130/143; a second run into a locked
``--out`` refuses; two runs with one seed are identical from step 1; an internal error is one line
plus a saved traceback (exit 70). Each behaviour has a fast in-process test; the ``slow`` ones do
the same with real processes (``kill -9`` at random moments, real signals, fresh interpreters).
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from retrofit.cli import main
from retrofit.train.checkpoint import (
    CHECKPOINT_NAME,
    WriteError,
    atomic_write,
    is_temp_name,
    load_checkpoint,
)
from retrofit.train.rundir import RunDirError, lock_run_dir
from retrofit.weights import read_weights

REPO = Path(__file__).resolve().parent.parent
TINY = "tests.user_models:tiny_resnet"
needs_flock = pytest.mark.skipif(sys.platform == "win32", reason="no flock on Windows")


pytestmark = pytest.mark.usefixtures("one_thread")


def _recipe(tmp: Path, **train) -> str:
    body = {
        "stochastic_depth": {"p_L": 0.5},
        "train": {"epochs": 1, "batch_size": 64, "img_size": 16, "workers": 0, "log_every": 1}
        | train,
    }
    path = tmp / f"recipe-{len(list(tmp.glob('recipe-*')))}.yaml"
    path.write_text(yaml.safe_dump(body))
    return str(path)


def _train_argv(recipe: str, out: Path, *extra: str) -> list[str]:
    return ["--model", TINY, "--recipe", recipe, "--train", "--out", str(out), "--no-progress",
            *extra]  # fmt: skip


def _cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _temps(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if is_temp_name(p.name))


def _error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- disk full ----------------------------------------------------------------------------------


class _FullDisk(io.RawIOBase):
    """A file object that accepts ``room`` bytes, then fails like a full disk."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        if len(b) > self.room:
            self.f.write(bytes(b[: self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self.f.write(b)


def test_write_error_names_the_file_and_keeps_the_previous_version(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"previous")
    big = {"w": torch.zeros(100_000)}
    # torch.save reports the failed write as a RuntimeError; atomic_write finds the OSError in it.
    with pytest.raises(WriteError) as e:
        atomic_write(path, lambda f: torch.save(big, _FullDisk(f, 4096)))
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert "checkpoint.pt" in str(e.value) and "No space left on device" in str(e.value)
    assert path.read_bytes() == b"previous" and _temps(tmp_path) == []


def test_disk_full_during_a_checkpoint_is_exit_2_and_keeps_the_previous(tmp_path, monkeypatch,
                                                                        capsys):  # fmt: skip
    import retrofit.train.checkpoint as ck

    recipe, out = _recipe(tmp_path), tmp_path / "run"
    argv = _train_argv(recipe, out)
    assert _cli(capsys, [*argv, "--max-steps", "2"])[0] == 0
    before = (out / CHECKPOINT_NAME).read_bytes()
    real = ck._serialize
    monkeypatch.setattr(ck, "_serialize", lambda obj, f: real(obj, _FullDisk(f, 10_000)))
    code, stdout, err = _cli(capsys, [*argv, "--resume", "--max-steps", "4"])
    # stdout has the run's own report up to the failure (plan, lint, data); never a traceback
    assert code == 2 and "Traceback" not in stdout + err
    line = _error_line(err)
    assert "checkpoint.pt" in line and "No space left on device" in line
    assert line.endswith(shlex.join(["retrofit-cli", *argv, "--max-steps", "4", "--resume"]))
    assert (out / CHECKPOINT_NAME).read_bytes() == before
    assert load_checkpoint(out / CHECKPOINT_NAME)["step"] == 2
    assert _temps(out) == []
    monkeypatch.setattr(ck, "_serialize", real)  # space freed: the same command continues
    assert _cli(capsys, [*argv, "--max-steps", "4", "--resume"])[0] == 0
    assert load_checkpoint(out / CHECKPOINT_NAME)["step"] == 4


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 2 MiB tmpfs (needs root and CAP_SYS_ADMIN; skipped elsewhere)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                              capture_output=True, timeout=20)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        done = None
    if done is None or done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root): the patched-writer test covers it")
    yield mnt
    subprocess.run(["umount", str(mnt)], capture_output=True, timeout=20)


def _fill(mnt: Path, leave: int) -> Path:
    filler = mnt / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def test_a_really_full_disk_is_exit_2_and_loses_nothing(small_tmpfs, tmp_path, capsys):
    recipe, out = _recipe(tmp_path), small_tmpfs / "run"
    argv = _train_argv(recipe, out)
    assert _cli(capsys, [*argv, "--max-steps", "2"])[0] == 0
    before = (out / CHECKPOINT_NAME).read_bytes()
    metrics = (out / "metrics.jsonl").read_text()
    for leave in (0, 40_000):  # nothing left, or room for the small files but not a checkpoint
        filler = _fill(small_tmpfs, leave)
        code, _, err = _cli(capsys, [*argv, "--resume", "--max-steps", "4"])
        assert code == 2, err
        assert "No space left on device" in _error_line(err)
        assert (out / CHECKPOINT_NAME).read_bytes() == before
        assert _temps(out) == []
        # the metrics may hold the steps run since (they are cut back on resume), never a torn line
        lines = (out / "metrics.jsonl").read_text().splitlines()
        assert all(json.loads(x) for x in lines) and "\n".join(lines).startswith(metrics.strip())
        filler.unlink()
    weights = small_tmpfs / "weights"
    _fill(small_tmpfs, 0)
    code, _, err = _cli(capsys, ["--model", TINY, "--recipe", recipe, "--out", str(weights)])
    assert code == 2 and "No space left on device" in _error_line(err)
    assert not weights.exists() and not any(small_tmpfs.glob(".weights*"))
    (small_tmpfs / "filler").unlink()
    assert _cli(capsys, [*argv, "--resume", "--max-steps", "4"])[0] == 0
    assert load_checkpoint(out / CHECKPOINT_NAME)["step"] == 4


# --- killed writes: stale temp files ------------------------------------------------------------


def test_stale_temp_files_are_removed_at_start_and_on_resume(tmp_path, capsys):
    recipe, out = _recipe(tmp_path), tmp_path / "run"
    out.mkdir()
    (out / ".checkpoint.pt.tmp-999999").write_bytes(b"PK\x03\x04 half a zip")  # kill -9 leftover
    argv = _train_argv(recipe, out)
    assert _cli(capsys, [*argv, "--max-steps", "2"])[0] == 0  # they do not make --out "not empty"
    assert _temps(out) == []
    (out / ".checkpoint.pt.tmp-4242").write_bytes(b"PK")
    (out / ".model.safetensors.tmp-4243").write_bytes(b"{")
    assert _cli(capsys, [*argv, "--resume", "--max-steps", "3"])[0] == 0
    assert _temps(out) == [] and load_checkpoint(out / CHECKPOINT_NAME)["step"] == 3


def test_fit_removes_stale_temp_files_too(tmp_path):
    from retrofit.train import TrainConfig, fit
    from tests.user_models import tiny_resnet

    out = tmp_path / "run"
    out.mkdir()
    (out / ".checkpoint.pt.tmp-31337").write_bytes(b"PK")
    cfg = TrainConfig(epochs=1, batch_size=64, img_size=16, workers=0)
    fit(tiny_resnet(), None, None, out=out, device="cpu", progress=False, config=cfg, max_steps=1)
    assert _temps(out) == [] and (out / CHECKPOINT_NAME).is_file()


# --- signals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"]
)
def test_an_interrupted_run_saves_says_how_to_resume_and_exits_128_plus_signal(
    tmp_path, monkeypatch, capsys, sig, code
):
    import retrofit.train.loop as loop

    real, calls = loop._train_step, {"n": 0}

    def step_then_signal(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), sig)  # arrives mid-step: the step completes, then the run stops
        return real(*a, **kw)

    monkeypatch.setattr(loop, "_train_step", step_then_signal)
    recipe, out = _recipe(tmp_path), tmp_path / "run"
    argv = _train_argv(recipe, out)
    got, stdout, err = _cli(capsys, argv)
    assert got == code
    assert f"stopped by {sig.name} at step 3" in stdout
    line = err.strip().splitlines()[-1]
    assert f"interrupted by {sig.name}" in line and "checkpoint of step 3" in line
    assert line.endswith(shlex.join(["retrofit-cli", *argv, "--resume"]))
    assert load_checkpoint(out / CHECKPOINT_NAME)["step"] == 3
    monkeypatch.setattr(loop, "_train_step", real)
    assert _cli(capsys, [*argv, "--resume", "--max-steps", "5"])[0] == 0
    assert load_checkpoint(out / CHECKPOINT_NAME)["step"] == 5


def test_ctrl_c_outside_training_is_130_in_one_line(monkeypatch, capsys, tmp_path):
    import retrofit.models

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(retrofit.models, "create_model", interrupted)
    code, _, err = _cli(capsys, ["--model", TINY, "--recipe", _recipe(tmp_path)])
    assert code == 130 and "interrupted" in _error_line(err)


# --- concurrent runs ----------------------------------------------------------------------------

_HOLD_LOCK = (
    "import fcntl, os, sys, time\n"
    "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
    "fcntl.flock(fd, fcntl.LOCK_EX)\n"
    "print('locked', flush=True)\n"
    "time.sleep(120)\n"
)


@needs_flock
def test_a_second_run_into_a_locked_out_refuses_and_writes_nothing(tmp_path, capsys):
    recipe, out = _recipe(tmp_path), tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out)], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in ([], ["--resume"]):
            code, _, err = _cli(capsys, _train_argv(recipe, out, *extra))
            assert code == 2 and "in use by another retrofit run" in _error_line(err)
        code, _, err = _cli(capsys, ["--model", TINY, "--recipe", recipe, "--out", str(out)])
        assert code == 2 and "in use by another retrofit run" in _error_line(err)
        assert list(out.iterdir()) == []
    finally:
        holder.kill()
        holder.wait()
    assert _cli(capsys, _train_argv(recipe, out, "--max-steps", "1"))[0] == 0  # lock released


def test_the_lock_is_reentrant_and_a_failed_start_leaves_nothing(tmp_path, monkeypatch):
    import retrofit.train.rundir as rundir

    out = tmp_path / "new" / "run"
    with lock_run_dir(out, fresh=True), lock_run_dir(out):  # the CLI around fit
        assert out.is_dir()
    with pytest.raises(ZeroDivisionError), lock_run_dir(out / "sub"):
        raise ZeroDivisionError
    assert not (out / "sub").exists()
    (out / "plan.json").write_text("{}")
    # another run wrote there between the early check and the lock: refused once locked
    monkeypatch.setattr(rundir, "check_out_dir", lambda *a, **kw: None)
    with pytest.raises(RunDirError, match="another run wrote"), lock_run_dir(out, fresh=True):
        pass
    assert (out / "plan.json").read_text() == "{}"


# --- reproducibility ----------------------------------------------------------------------------


def _run_losses(capsys, recipe: str, out: Path, *extra: str) -> tuple[list[float], dict]:
    assert _cli(capsys, _train_argv(recipe, out, "--max-steps", "3", *extra))[0] == 0
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    return losses, read_weights(out / "model.safetensors")


def test_same_seed_runs_are_identical_from_step_1(tmp_path, capsys):
    recipe = _recipe(tmp_path, seed=7)
    # The first run moves the process's global RNG: the second starts from another state, as a
    # second process would. Only seeding the model's construction makes them agree.
    a, wa = _run_losses(capsys, recipe, tmp_path / "a")
    b, wb = _run_losses(capsys, recipe, tmp_path / "b")
    assert len(a) == 3 and a == b
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c, _ = _run_losses(capsys, recipe, tmp_path / "c", "--seed", "8")
    assert c[0] != a[0]  # the seed is what decides


# --- internal errors ----------------------------------------------------------------------------


def test_an_internal_error_is_one_line_and_its_traceback_is_saved(monkeypatch, capsys, tmp_path):
    import tempfile

    import retrofit.cli as cli

    def bug(*a, **kw):
        raise ZeroDivisionError("synthetic bug")

    monkeypatch.setattr(cli, "_print_stages", bug)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    code, _, err = _cli(capsys, ["--model", TINY, "--stages"])
    assert code == 70  # never 1: that is lint findings only
    line = _error_line(err)
    assert "internal error" in line and "synthetic bug" in line and "ZeroDivisionError" in line
    saved = Path(re.search(r"full traceback in (\S+)", line)[1])
    assert saved.parent == tmp_path
    text = saved.read_text()
    assert "Traceback (most recent call last)" in text and "in bug" in text
    code, _, err = _cli(capsys, ["--model", TINY, "--stages", "--debug"])
    assert code == 70 and "Traceback (most recent call last)" in err and "in bug" in err
    assert err.strip().splitlines()[-1].startswith("retrofit-cli: internal error")


def test_debug_also_shows_the_traceback_of_bad_input(capsys, tmp_path):
    code, _, err = _cli(capsys, ["--model", "tv:nope", "--recipe", _recipe(tmp_path), "--debug"])
    assert code == 2 and "Traceback" in err
    assert err.strip().splitlines()[-1].startswith("retrofit-cli: error: unknown model 'nope'")


# --- the same, with real processes (slow) -------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _cli_process(*argv: str) -> list[str]:
    return [sys.executable, "-m", "retrofit.cli", *argv]


_KILLABLE = r"""
import sys
import torch
from torch import nn
from retrofit.train import TrainConfig, fit

torch.set_num_threads(1)
torch.manual_seed(0)
# A wide layer makes each checkpoint (weights + Adam moments) ~10 MB: writes take a while.
model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 1024), nn.ReLU(), nn.Linear(1024, 10))
cfg = TrainConfig(epochs=100, batch_size=32, img_size=16, workers=0, log_every=1000,
                  checkpoint_every=1, warmup_epochs=0)
max_steps = int(sys.argv[2]) if len(sys.argv) > 2 else None
fit(model, None, None, out=sys.argv[1], device="cpu", resume=True, progress=False, config=cfg,
    max_steps=max_steps)
"""


@pytest.mark.slow
def test_kill_9_during_checkpoint_writes_never_loses_the_last_checkpoint(tmp_path):
    script = tmp_path / "killable.py"
    script.write_text(_KILLABLE)
    out = tmp_path / "run"
    rng = random.Random(20261130)  # the moments are random, and reproducible from this seed
    last_step, torn = 0, 0
    for attempt in range(4):
        proc = subprocess.Popen([sys.executable, str(script), str(out)], env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        mine = f".{CHECKPOINT_NAME}.tmp-{proc.pid}"
        deadline = time.monotonic() + 300
        # Wait for one of this process's checkpoint writes to be under way, then kill it at a
        # random moment: early in that write (even attempts), or anywhere in the next half
        # second, between or inside later writes (odd attempts).
        while not ((out / CHECKPOINT_NAME).is_file() and (out / mine).exists()):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended early"
            time.sleep(0.001)
        time.sleep(rng.uniform(0.0, 0.01) if attempt % 2 == 0 else rng.uniform(0.01, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = load_checkpoint(out / CHECKPOINT_NAME)  # complete and readable, every time
        assert state["step"] >= last_step
        last_step = state["step"]
        torn += (out / mine).exists()
    print(f"kills inside a checkpoint write: {torn}/4, last step {last_step}")
    assert torn >= 1, "no kill landed inside a write: the test proved nothing"
    # A resumed run removes the killed writes' temp files and continues from the last checkpoint.
    done = subprocess.run([sys.executable, str(script), str(out), str(last_step + 2)],
                          env=_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert _temps(out) == []
    assert load_checkpoint(out / CHECKPOINT_NAME)["step"] == last_step + 2


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"]
)
def test_real_signals_exit_128_plus_signal_and_the_printed_command_resumes(tmp_path, sig, code):
    recipe, out = _recipe(tmp_path, epochs=50, checkpoint_every=1), tmp_path / "run"
    proc = subprocess.Popen(_cli_process(*_train_argv(recipe, out)), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not (out / CHECKPOINT_NAME).is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == code, stderr
    step = load_checkpoint(out / CHECKPOINT_NAME)["step"]
    line = stderr.strip().splitlines()[-1]
    assert f"interrupted by {sig.name}" in line and f"checkpoint of step {step}" in line
    command = shlex.split(line.split("continue with: ", 1)[1])
    assert command[0] == "retrofit-cli" and command[-1] == "--resume"
    resumed = subprocess.run(_cli_process(*command[1:], "--max-steps", str(step + 1)),
                             env=_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(out / CHECKPOINT_NAME)["step"] == step + 1


@pytest.mark.slow
def test_same_seed_in_two_fresh_processes_is_identical(tmp_path):
    recipe = _recipe(tmp_path, seed=3)
    losses, weights = [], []
    for name in ("a", "b"):
        out = tmp_path / name
        argv = _train_argv(recipe, out, "--max-steps", "3")
        done = subprocess.run(_cli_process(*argv), env=_env(), capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr
        records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        losses.append([r["loss"] for r in records])
        weights.append(read_weights(out / "model.safetensors"))
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.slow
@needs_flock
def test_two_runs_started_together_into_one_out_one_refuses(tmp_path):
    recipe, out = _recipe(tmp_path), tmp_path / "run"
    argv = _train_argv(recipe, out, "--max-steps", "3")
    procs = [
        subprocess.Popen(
            _cli_process(*argv),
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    line = _error_line(refused)
    assert "--out" in line and re.search(r"in use by another|not an empty|another run wrote", line)
    assert load_checkpoint(out / CHECKPOINT_NAME)["step"] == 3
    assert read_weights(out / "model.safetensors")
