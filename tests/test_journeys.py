"""The paths users run, end to end, as subprocesses typed the way the README shows them.

Each piece has its own tests; these drive the commands through the seams between them (issue 19):

- the CLI under ``torchrun --nproc_per_node 2`` (gloo on CPU): it trains (one lock per run, on the
  rank that writes), is interrupted by SIGINT and by SIGKILL, resumed by the exact command it
  printed (the launcher included), and ends with the weights of an uninterrupted run; a resume
  with another number of processes continues only at the same global batch, else it is refused
  with one line saying how to resume;
- ``--model hf:DIR --train`` on a tiny transformers config (the loss reads ``ModelOutput.logits``),
  and a failing run that leaves its ``--out`` as it found it;
- ``compare`` with 2 seeds.

Tiny settings throughout: the two-block ``tests.user_models:tiny_resnet`` at 16 px on the embedded
digits. The torchrun journey is ``slow`` (five launches of three interpreters each on a shared
2-core machine, ~1 min): it is the issue's acceptance test, and the only one that needs torchrun.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from retrofit.train.checkpoint import CHECKPOINT_NAME, load_checkpoint
from retrofit.weights import read_weights

REPO = Path(__file__).resolve().parent.parent
TINY = "tests.user_models:tiny_resnet"
TIMEOUT = 300


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env.pop("RETROFIT_DEBUG", None)
    return env


def _run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env() | env, capture_output=True, text=True,
                          timeout=TIMEOUT)  # fmt: skip


def _weights_diff(a: Path, b: Path) -> float:
    wa, wb = read_weights(a), read_weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa if wa[k].numel())


# --- torchrun -----------------------------------------------------------------------------------

# The README's command (recipes/sd_batch.yaml, batch mode, gates seeded), on the tiny model:
# 1438 digits / (2 processes × 64) = 11 steps per epoch, 8 epochs = 88 steps (an epoch takes
# well under a second: a kill after a checkpoint lands before the run ends).
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
TRAIN = ["-m", "retrofit.cli", "--model", TINY, "--recipe", str(REPO / "recipes/sd_batch.yaml"),
         "--train", "--epochs", "8", "--img-size", "16", "--no-progress"]  # fmt: skip


def _start(cmd: list[str], cwd: Path) -> subprocess.Popen:
    # Its own session, as a terminal's job: Ctrl-C is a SIGINT to its process group (torchrun's
    # agent; the agent forwards it to the workers, which torchrun starts in sessions of their own).
    return subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip


def _descendants(pid: int) -> list[int]:
    """``pid``'s child processes, recursively (torchrun starts each worker in its own session,
    so a signal to the launcher's process group reaches the agent alone)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _wait_for_checkpoint(proc: subprocess.Popen, out: Path, after: float = -1.0) -> None:
    """Until ``out`` holds a checkpoint written after ``after`` (a mtime)."""
    deadline = time.monotonic() + TIMEOUT
    path = out / CHECKPOINT_NAME
    while not (path.is_file() and path.stat().st_mtime_ns > after):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.02)


def _no_retrofit_traceback(stderr: str) -> None:
    """No retrofit frame in any traceback: the workers stop cleanly (torchrun's agent reports
    the signal it got with its own traceback, in torch/distributed)."""
    assert "KeyboardInterrupt" not in stderr, stderr[-3000:]
    assert f"{os.sep}retrofit{os.sep}" not in "".join(
        line for line in stderr.splitlines(True) if line.lstrip().startswith("File ")
    ), stderr[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(
    not Path("/proc/self/stat").exists(), reason="finds torchrun's workers in /proc"
)
def test_torchrun_cli_interrupted_and_resumed_by_its_printed_command_matches_uninterrupted(
    tmp_path,
):
    # 1. Uninterrupted: the README's command under torchrun trains (one lock, rank 0's).
    ref = _run([*TORCHRUN, *TRAIN, "--out", "ref"], tmp_path)
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-4000:]
    assert "in use by another retrofit run" not in ref.stderr
    assert "trained 88/88 steps" in ref.stdout, ref.stdout
    assert load_checkpoint(tmp_path / "ref" / CHECKPOINT_NAME)["world_size"] == 2

    # 2. Ctrl-C (SIGINT to the process group) after the first checkpoint: every rank finishes
    # its step, rank 0 saves, the command that resumes is printed once, with the launcher.
    out = tmp_path / "run"
    proc = _start([*TORCHRUN, *TRAIN, "--out", "run"], tmp_path)
    _wait_for_checkpoint(proc, out)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=TIMEOUT)
    _no_retrofit_traceback(stderr)
    lines = [ln for ln in stderr.splitlines() if ln.startswith("retrofit-cli: interrupted by")]
    assert len(lines) == 1, stderr[-3000:]
    step = load_checkpoint(out / CHECKPOINT_NAME)["step"]
    assert 0 < step < 88 and f"checkpoint of step {step}" in lines[0]
    command = shlex.split(lines[0].split("continue with: ", 1)[1])
    assert command[: len(TORCHRUN)] == TORCHRUN, command  # the launcher, as it was typed
    assert command[len(TORCHRUN) :] == [*TRAIN, "--out", "run", "--resume"]
    shutil.copytree(out, tmp_path / "single")
    _resume_in_one_process(tmp_path, step)

    # 3. The resumed run is killed (SIGKILL to every process, as a crashed node) once it has
    # written a later checkpoint; the same printed command resumes it again, to the end.
    first = (out / CHECKPOINT_NAME).stat().st_mtime_ns
    proc = _start(command, tmp_path)
    _wait_for_checkpoint(proc, out, after=first)
    for pid in [proc.pid, *_descendants(proc.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=TIMEOUT)
    time.sleep(0.5)  # the killed workers' ends (they are not this process's children)
    killed_at = load_checkpoint(out / CHECKPOINT_NAME)["step"]
    assert step < killed_at < 88, "the kill came after the run ended: it proved nothing"
    done = _run(command, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "trained 88/88 steps" in done.stdout, done.stdout

    diff = _weights_diff(tmp_path / "ref" / "model.safetensors", out / "model.safetensors")
    print(f"SIGINT at step {step}, SIGKILL after step {killed_at}: max |Δweight| {diff:.3g}")
    assert diff == 0.0


def _resume_in_one_process(tmp_path: Path, step: int) -> None:
    """The 2-process checkpoint resumed by one process: refused with one line that names the
    torchrun command (what the old hint, ``retrofit-cli … --resume``, led to) and the batch size
    that keeps the global batch (that continuation is tested in-process below)."""
    single = [sys.executable, *TRAIN, "--out", "single"]
    refused = _run([*single, "--resume"], tmp_path)
    assert refused.returncode == 2, refused.stderr[-3000:]
    line = refused.stderr.strip().splitlines()
    assert len(line) == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert "2 process(es)" in line[0] and "128 images per step" in line[0], line[0]
    how = line[0].split("resume it with: ", 1)[1]
    assert how == shlex.join([*TORCHRUN, *TRAIN, "--out", "single", "--resume"]), how
    assert "batch_size 128" in line[0]
    assert load_checkpoint(tmp_path / "single" / CHECKPOINT_NAME)["step"] == step  # untouched


# --- hf:DIR -------------------------------------------------------------------------------------


def test_hf_model_dir_trains_through_the_cli(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                    num_labels=10)  # fmt: skip
    cfg.save_pretrained(tmp_path / "hf")
    cmd = [sys.executable, "-m", "retrofit.cli", "--model", f"hf:{tmp_path / 'hf'}", "--recipe",
           str(REPO / "recipes/sd.yaml"), "--train", "--epochs", "1", "--img-size", "16",
           "--max-steps", "3", "--out", "run", "--no-progress"]  # fmt: skip
    done = _run(cmd, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained 3/22 steps" in done.stdout, done.stdout
    # The stripped weights load into the original transformers class.
    model = transformers.ResNetForImageClassification(cfg)
    weights = read_weights(tmp_path / "run" / "model.safetensors")
    model.load_state_dict(weights, strict=True)
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)["step"] == 3


def test_logits_of_unwraps_every_output_form():
    from retrofit.train.outputs import logits_of

    t = torch.randn(2, 3)
    transformers = pytest.importorskip("transformers")
    hf = transformers.modeling_outputs.ImageClassifierOutput(loss=None, logits=t)
    for output in (t, hf, {"logits": t, "aux": t + 1}, (t, t + 1), [t]):
        assert logits_of(output) is t
    with pytest.raises(TypeError, match="keys \\['features'\\]"):
        logits_of({"features": t})
    with pytest.raises(TypeError, match="str"):
        logits_of("x")


def test_a_failing_run_leaves_its_out_as_it_found_it(tmp_path, capsys, monkeypatch):
    """A run that fails after writing its preamble (recipe, plan, lint, survival plot) and before
    its first checkpoint removes what it wrote: the same command can be run again."""
    import retrofit.train.loop as loop
    from retrofit.cli import main

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in a step")

    monkeypatch.setattr(loop, "_train_step", broken)
    argv = ["--model", TINY, "--recipe", str(REPO / "recipes/sd.yaml"), "--train", "--epochs",
            "1", "--img-size", "16", "--no-progress"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "new")]) == 70
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    assert main([*argv, "--out", str(tmp_path / "empty")]) == 70
    assert list((tmp_path / "empty").iterdir()) == []
    assert "a bug in a step" in capsys.readouterr().err


# --- compare ------------------------------------------------------------------------------------


@pytest.mark.slow  # 4 trainings in a fresh interpreter: ~15 s alone, ~45 s on a loaded machine
def test_compare_with_two_seeds(tmp_path):
    cmd = [sys.executable, "-m", "retrofit.cli", "compare", "--model", TINY, "--recipes",
           str(REPO / "recipes/study/none.yaml"), str(REPO / "recipes/sd.yaml"),
           "--train-kwargs", "epochs=1", "img_size=16", "batch_size=32", "--seeds", "2",
           "--data", "digits:per_class=20", "--out", "ab",
           "--no-progress", "--threads", "1"]  # fmt: skip
    done = _run(cmd, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    table = json.loads((tmp_path / "ab" / "table.json").read_text())
    rows = {r["variant"]: r for r in table["rows"]}
    assert set(rows) == {"none", "sd"} and all(r["n"] == 2 for r in rows.values())
    assert (tmp_path / "ab" / "plot.png").stat().st_size > 0
    header = (tmp_path / "ab" / "table.md").read_text().splitlines()[0]
    assert "1 thread(s)" in header
    # --report-only (no --threads) trains nothing and keeps the header's thread count: the
    # table describes the runs, which ran on 1 thread.
    again = _run([*cmd[:-2], "--report-only"], tmp_path, OMP_NUM_THREADS="3")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "ab" / "table.md").read_text().splitlines()[0] == header


# --- the pieces of the torchrun journey, in-process (fast) ----------------------------------------


def test_the_launcher_is_read_back_from_torchrun_command_line():
    from retrofit.train.distributed import launch_command

    env = {"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "1"}
    args = ["--model", TINY, "--train", "--out", "D"]
    typed = ["/venv/bin/python3", "/venv/bin/torchrun", "--nproc_per_node=2", "--standalone",
             "-m", "retrofit.cli", *args]  # fmt: skip
    assert launch_command(args, environ=env, parent_cmdline=typed) == (
        ["torchrun", "--nproc_per_node=2", "--standalone"],
        ["-m", "retrofit.cli"],
    )
    typed = ["python", "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "8",
             "--rdzv_endpoint", "HOST:29500", "retrofit/cli.py", *args]  # fmt: skip
    assert launch_command(args, environ=env, parent_cmdline=typed) == (
        ["python", "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "8",
         "--rdzv_endpoint", "HOST:29500"],
        ["retrofit/cli.py"],
    )  # fmt: skip
    # No readable parent: rebuilt from torchrun's variables; outside torchrun: None.
    assert launch_command(args, environ=env, parent_cmdline=["bash"]) == (
        ["torchrun", "--nnodes", "1", "--nproc_per_node", "2", "--standalone"],
        ["-m", "retrofit.cli"],
    )
    assert launch_command(args, environ={}) is None


def test_only_rank_0_locks_the_run_dir(tmp_path, monkeypatch):
    import retrofit.train
    from retrofit.cli import main

    # Rank 0 (another process) holds --out while rank 1 starts: rank 1 must not take the lock.
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        seen = {}

        def fake_fit(model, recipe, data, *, out=None, **kw):
            seen["out"] = out
            raise SystemExit(0)

        monkeypatch.setattr(retrofit.train, "fit", fake_fit)
        monkeypatch.setenv("RANK", "1")
        argv = ["--model", TINY, "--recipe", str(REPO / "recipes/sd.yaml"), "--train",
                "--out", str(out), "--no-progress", "--img-size", "16"]  # fmt: skip
        with pytest.raises(SystemExit):
            main(argv)
    finally:
        holder.kill()
        holder.wait()
    assert seen["out"] == out  # rank 1 got to fit without taking (or failing on) the lock

    from retrofit.train.rundir import writes_run_dir

    assert not writes_run_dir()
    monkeypatch.setenv("RANK", "0")
    assert writes_run_dir()
    monkeypatch.delenv("RANK")
    assert writes_run_dir()


def test_a_checkpoint_of_another_world_size_is_refused_unless_the_global_batch_is_kept(
    tmp_path, one_thread
):
    from retrofit.errors import ModelError
    from retrofit.train import TrainConfig, fit
    from retrofit.train.checkpoint import save_checkpoint
    from tests.user_models import tiny_resnet

    cfg = TrainConfig(epochs=1, batch_size=32, img_size=16, workers=0, log_every=2)
    fit(tiny_resnet(), None, None, out=tmp_path, device="cpu", progress=False, max_steps=4,
        config=cfg)  # fmt: skip
    # Pretend 2 processes × 16 images wrote it (the same 32 images per step), then 2 × 32.
    ckpt = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    ckpt["world_size"], ckpt["per_rank"] = 2, ckpt["per_rank"] * 2
    ckpt["config"]["batch_size"] = 16
    ckpt["launch"] = {"launcher": ["torchrun", "--nproc_per_node", "2"], "entry": ["x.py"]}
    save_checkpoint(ckpt, tmp_path / CHECKPOINT_NAME)
    res = fit(tiny_resnet(), None, None, out=tmp_path, device="cpu", progress=False, resume=True,
              max_steps=6, config=cfg)  # fmt: skip
    assert res.step == 6 and res.total_steps == 44
    # The lr schedule went on from step 4 (an uninterrupted run's lr at step 6), not from 0 and
    # not on a schedule of another length.
    ref = fit(tiny_resnet(), None, None, out=tmp_path / "ref", device="cpu", progress=False,
              max_steps=6, config=cfg)  # fmt: skip
    lr = {r["step"]: r["lr"] for r in res.history if r["kind"] == "step"}
    ref_lr = {r["step"]: r["lr"] for r in ref.history if r["kind"] == "step"}
    assert lr[6] == pytest.approx(ref_lr[6], rel=1e-12) and lr[6] > 1e-4
    ckpt = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    ckpt["world_size"], ckpt["per_rank"] = 2, ckpt["per_rank"] * 2
    ckpt["launch"] = {"launcher": ["torchrun", "--nproc_per_node", "2"], "entry": ["x.py"]}
    save_checkpoint(ckpt, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(ModelError, match="2 process\\(es\\) × batch_size 32 = 64 images") as e:
        fit(tiny_resnet(), None, None, out=tmp_path, device="cpu", progress=False, resume=True,
            config=cfg)  # fmt: skip
    assert e.value.launch == (["torchrun", "--nproc_per_node", "2"], ["x.py"])
    assert e.value.batch_size == 64 and "batch_size 64" in str(e.value)


# --- compare's pictures -------------------------------------------------------------------------


def _two_seed_rows():
    from retrofit.compare import report

    records = [
        {"variant": v, "seed": s, "test_acc": a, "train_acc": a + 0.1, "gap": 0.1 + 0.05 * s,
         "epoch_s": 1.0, "cpu_s": 2.0, "wall_s": 2.0, "edits": 2}
        for v, accs in (("none", (0.65, 0.82)), ("sd", (0.70, 0.78)))
        for s, a in enumerate(accs)
    ]  # fmt: skip
    return report.summarise(records, ["none", "sd"], "none")


def test_compare_plot_keeps_accuracy_within_what_it_can_be(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from retrofit.compare import report

    rows = _two_seed_rows()
    assert rows[0]["test_acc"]["ci95"] * 100 > 100  # 2 seeds: t = 12.7, the interval is wide
    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figures.append(fig), close(fig)))
    report.plot(rows, tmp_path / "plot.png", "t")
    acc, gap = figures[0].axes[:2]
    lo, hi = acc.get_ylim()
    assert lo >= 0.0 and hi <= 100.0, (lo, hi)
    assert gap.get_ylim()[0] >= -100.0 and gap.get_ylim()[1] <= 100.0
    # The seeds' points (65-82 %) are in view.
    assert lo <= 65.0 and hi >= 82.0


def test_curves_of_a_short_run_have_no_empty_panel(tmp_path, monkeypatch):
    from retrofit.train import plots

    layers = {f"layer1.{i}.retrofit_stochastic_depth0": {"kind": "stochastic_depth",
              "depth": i + 1, "survival": p} for i, p in enumerate((0.75, 0.5))}  # fmt: skip
    rates = {n: {"kept_fraction": 0.8 - 0.2 * i} for i, n in enumerate(layers)}
    # 22 steps logged every 10: one step record, two epoch records.
    records = [
        {"kind": "step", "step": 10, "loss": 2.0, "lr": 1e-3, "rates": rates},
        {"kind": "epoch", "step": 11, "epoch": 0, "train_loss": 2.0, "val_loss": 1.9,
         "val_top1": 30.0, "val_top5": 70.0, "lr": 7e-4},
        {"kind": "epoch", "step": 22, "epoch": 1, "train_loss": 1.5, "val_loss": 1.4,
         "val_top1": 50.0, "val_top5": 90.0, "lr": 1e-6},
    ]  # fmt: skip
    figures = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda plt, fig, path: (figures.append(fig),
                                                                save(plt, fig, path))[1])  # fmt: skip
    assert plots.plot_curves(records, tmp_path / "curves.png", layers=layers).is_file()
    (fig,) = figures
    titles = {ax.get_title(): ax for ax in fig.axes}
    # The lr panel shows the lr over the run (from the epoch records): three points, not one.
    lr = titles["learning rate"]
    assert [len(line.get_xdata()) for line in lr.lines] == [3]
    # No heatmap of a single log window; the plan vs run panel shows both blocks.
    assert not any(ax.images for ax in fig.axes)
    plan = titles["stochastic depth: plan vs run"]
    marks = [[float(x) for x in line.get_xdata()] for line in plan.lines]
    assert marks == [[0.75, 0.5], pytest.approx([0.8, 0.6])]


# --- every retrofit-cli command in README.md --------------------------------------------------


def _readme_commands() -> list[tuple[str, list[str]]]:
    """``(launcher, argv)`` of every ``retrofit-cli`` / ``-m retrofit.cli`` command in README.md's
    code blocks (continued lines joined, ``&&`` chains split, comments dropped)."""
    text = (REPO / "README.md").read_text()
    out = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.removeprefix("$ ")
            if "retrofit-cli" not in line and "retrofit.cli" not in line:
                continue
            for part in line.split("&&"):
                tokens = shlex.split(part, comments=True)
                if "retrofit-cli" in tokens:
                    command = ("retrofit-cli", tokens[tokens.index("retrofit-cli") + 1 :])
                elif "retrofit.cli" in tokens:
                    command = (tokens[0], tokens[tokens.index("retrofit.cli") + 1 :])
                else:
                    continue
                if command not in out:  # the demo's command is shown twice
                    out.append(command)
    return out


README_COMMANDS = _readme_commands()


def _parse(argv: list[str]) -> None:
    from retrofit.cli import SUBCOMMANDS, _main_parser
    from retrofit.compare.command import parser as compare_parser

    if argv[0] == "compare":
        compare_parser().parse_args(argv[1:])
    elif argv[0] in SUBCOMMANDS:
        SUBCOMMANDS[argv[0]].parser().parse_args(argv[1:])
    else:
        _main_parser().parse_args(argv)


def test_readme_shows_the_commands_this_module_runs():
    commands = [" ".join(argv) for _, argv in README_COMMANDS]
    assert len(commands) >= 14, commands
    assert any(launcher == "torchrun" for launcher, _ in README_COMMANDS)
    assert any(argv[:1] == ["compare"] for _, argv in README_COMMANDS)
    for _, argv in README_COMMANDS:
        _parse(argv)  # argparse exits 2 on a flag the CLI no longer has
        for token in argv:
            if token.startswith("recipes/") or token.startswith("examples."):
                path = token if token.startswith("recipes/") else token.split(":")[0]
                path = path.replace(".", "/") + ".py" if token.startswith("examples.") else path
                assert (REPO / path).exists(), f"README names {token}, which does not exist"


# Placeholders in the README's commands → something that exists here; sizes made small.
_STAND_INS = {
    "mypkg.models:build": "tests.user_models:dropout_before_bn",
    "hf:./swin_config_dir": "hf:{tmp}/swin_config_dir",
    "runs/demo": "{tmp}/runs/demo",
    "out/": "{tmp}/out",
}
# Exit codes the README states for a command (the rest: 0).
_EXPECTED = {"lint": 1}


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path, capsys, monkeypatch, one_thread):
    """Every retrofit-cli command of README.md, executed in this process with the stand-ins
    above; training stops after one step at 16 px. compare and the torchrun commands are run
    by the journeys above (on the tiny model); here they are parsed only."""
    from retrofit.cli import main

    transformers = pytest.importorskip("transformers")
    transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                            num_heads=[1, 2], window_size=4).save_pretrained(tmp_path / "swin_config_dir")  # fmt: skip
    monkeypatch.chdir(REPO)
    ran = []
    for launcher, argv in README_COMMANDS:
        if launcher != "retrofit-cli" or argv[0] == "compare":
            continue
        argv = [_STAND_INS.get(a, a).format(tmp=tmp_path) for a in argv]
        # Every run directory the README names goes under tmp: nothing is written into the repo.
        argv = [str(tmp_path / a) if a.startswith("runs/") else a for a in argv]
        if "--train" in argv and "--print-config" not in argv:
            argv += ["--max-steps", "1", "--img-size", "16", "--no-progress"]
        code = main(argv)
        out, err = capsys.readouterr()
        assert code == _EXPECTED.get(argv[0], 0), (argv, err[-2000:])
        ran.append(argv)
    assert len(ran) >= 12, ran  # all but compare and torchrun
    assert (tmp_path / "runs" / "demo" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "model.safetensors").is_file()
