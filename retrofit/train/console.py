"""What a training run says while it runs: up front, once per epoch, and at the end.

A run reports five things: what it will do (the plan's summary, the lint verdict, the data and
the schedule), progress inside an epoch, one line per epoch (losses, top-1/top-5, lr, images/s,
the regularizers' kept fractions, time, the checkpoint), and a final summary. :class:`Console`
renders them for one audience:

- ``text``: lines for a person on ``stream`` (stdout). On a terminal a tqdm bar (on stderr) shows
  the epoch's progress and gives way to the epoch's line when the epoch ends; elsewhere (nohup, CI
  logs, a cluster job) long epochs print a progress line at most every ``progress_every_s``.
- ``json``: one JSON object per line on ``stream``: ``{"kind": "start"}``, every ``metrics.jsonl``
  record as it is written, ``{"kind": "result"}`` last. For machines; no bars.
- ``quiet``: the final summary only; ``silent``: nothing (the caller prints its own result).
- ``log``: the same lines through :mod:`logging` (logger ``retrofit.train``, INFO; the lint verdict
  at WARNING when it has findings), plus the bar on a terminal: what ``fit`` does for a library
  caller who passes nothing.

Only rank 0 reports under torchrun (:meth:`Console.silent` for the others).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

from retrofit.techniques import console_parts

log = logging.getLogger("retrofit.train")

MODES = ("text", "json", "quiet", "silent", "log")


class Console:
    """Renders a run's reports for a person, a machine, or the logging system (see module doc).

    Args:
        mode: ``text``, ``json``, ``quiet``, ``silent`` or ``log``.
        progress: allow progress bars (they still need a terminal on ``bar_stream``).
        stream: where lines go (default: ``sys.stdout`` at the time of each write).
        bar_stream: where bars go (default: ``sys.stderr``).
        progress_every_s: without a bar, the least time between two progress lines in an epoch.
        resume_hint: how the caller resumes an interrupted run (the CLI says ``--resume --out DIR``).
        header: a first line for :meth:`start` (the CLI names the model and its zoo there).
    """

    def __init__(
        self,
        mode: str = "text",
        *,
        progress: bool = True,
        stream: IO[str] | None = None,
        bar_stream: IO[str] | None = None,
        progress_every_s: float = 60.0,
        resume_hint: str = "resume=True",
        header: str | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"Console mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self._stream = stream
        self._bar_stream = bar_stream
        self.progress_every_s = progress_every_s
        self.resume_hint = resume_hint
        self.header = header
        self.bars = progress and mode in ("text", "log") and _isatty(self.bar_stream)
        self._last_line = time.perf_counter()

    @property
    def stream(self) -> IO[str]:
        return self._stream if self._stream is not None else sys.stdout

    @property
    def bar_stream(self) -> IO[str]:
        return self._bar_stream if self._bar_stream is not None else sys.stderr

    def silent(self) -> Console:
        """A console that reports nothing (for ranks other than 0)."""
        return Console("silent", progress=False, stream=self._stream)

    # --- hooks the trainer calls --------------------------------------------------------------

    def start(self, info: Mapping[str, Any]) -> None:
        """Before the first step: ``info`` as built by the trainer (``kind: start``)."""
        if self.mode == "json":
            self._json(info)
            return
        if self.mode in ("quiet", "silent"):
            return
        lines = ([self.header] if self.header else []) + start_lines(info)
        if self.mode == "log":
            for line in lines:
                findings = line.startswith("lint:") and bool(info.get("lint_findings"))
                log.log(logging.WARNING if findings else logging.INFO, "%s", line)
            return
        self._print(*lines)

    def epoch_bar(self, epoch: int, epochs: int, total: int, initial: int) -> Any:
        """A tqdm bar for one epoch's steps, or None (no terminal, or bars not wanted)."""
        return self._bar(total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs}")

    def eval_bar(self, total: int) -> Any:
        return self._bar(total=total, initial=0, desc="evaluating")

    def step(self, rec: Mapping[str, Any], bar: Any, *, epochs: int, total_steps: int) -> None:
        """At each log step: the bar's postfix, a JSON line, or (no bar) a throttled line."""
        if bar is not None:
            bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['images_per_s']:.0f}")
            return
        if self.mode == "json":
            self._json(rec)
            return
        if self.mode not in ("text", "log"):
            return
        now = time.perf_counter()
        if now - self._last_line < self.progress_every_s:
            return
        line = step_line(rec, epochs=epochs, total_steps=total_steps)
        if self.mode == "log":
            log.info("%s", line)
            self._last_line = now
        else:
            self._print(line)

    def epoch(self, rec: Mapping[str, Any], *, epochs: int) -> None:
        """After an epoch's evaluation and checkpoint: its ``metrics.jsonl`` record."""
        if self.mode == "json":
            self._json(rec)
        elif self.mode == "log":
            log.info("%s", epoch_line(rec, epochs=epochs))
        elif self.mode == "text":
            self._print(epoch_line(rec, epochs=epochs))

    def finish(self, result: Mapping[str, Any]) -> None:
        """At the end: ``result`` as from :func:`result_record`."""
        if self.mode == "silent":
            return
        if self.mode == "json":
            self._json(result)
            return
        lines = finish_lines(result, self.resume_hint)
        if self.mode == "log":
            for line in lines:
                log.info("%s", line)
            return
        self._print(*lines)

    # --- output -------------------------------------------------------------------------------

    def _print(self, *lines: str) -> None:
        stream = self.stream
        for line in lines:
            stream.write(line + "\n")
        stream.flush()  # a pipe or a file is block-buffered: a log must show each line as it comes
        self._last_line = time.perf_counter()

    def _json(self, rec: Mapping[str, Any]) -> None:
        self._print(json.dumps(dict(rec), default=str))

    def _bar(self, *, total: int, initial: int, desc: str) -> Any:
        if not self.bars:
            return None
        from tqdm.auto import tqdm

        # leave=False: the bar clears itself, and the epoch's line takes its place.
        return tqdm(
            total=total,
            initial=initial,
            desc=desc,
            leave=False,
            dynamic_ncols=True,
            file=self.bar_stream,
        )


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a real file
        return False


# --- rendering (pure functions of the records) ------------------------------------------------


def start_lines(info: Mapping[str, Any]) -> list[str]:
    """The lines printed before the first step."""
    lines = []
    if info.get("task_note"):
        lines.append(str(info["task_note"]))
    if info.get("plan"):
        lines.append(f"plan: {info['plan']}")
    if info.get("lint"):
        lines.append(f"lint: {info['lint']}")
    size = "×".join(str(s) for s in info.get("input_size") or ())
    data = str(info.get("data"))
    if "train" not in data:  # the loaders' descriptions of the small sets carry their counts
        data += f" ({info.get('train_samples')} train / {info.get('val_samples')} val images)"
    background = " (background included)" if info.get("task") in _DENSE else ""
    lines.append(f"data: {data}; {info.get('num_classes')} classes{background}, input {size}")
    warmup = info.get("warmup_epochs")
    sched = f"{info.get('sched')}" + (
        f", warmup {warmup:g} {_plural(warmup, 'epoch')}" if warmup else ""
    )
    processes = info.get("processes", 1)
    lines.append(
        f"train: {_count(info.get('epochs'), 'epoch')} × {info.get('steps_per_epoch')} steps, "
        f"{info.get('images_per_step')} images/step, {info.get('opt')} lr {info.get('lr'):g} "
        f"({sched}), {info.get('device')} {info.get('precision')}"
        + (f", {processes} processes" if processes and processes > 1 else "")
        + (f", {_count(info['workers'], 'loader worker')}" if info.get("workers") else "")
    )
    if info.get("resumed_at"):
        lines.append(f"resuming at step {info['resumed_at']} of {info.get('total_steps')}")
    if info.get("out"):
        lines.append(f"run directory: {info['out']}")
    return lines


def step_line(rec: Mapping[str, Any], *, epochs: int, total_steps: int) -> str:
    """A progress line inside an epoch (when no bar shows it)."""
    pct = 100.0 * rec["step"] / max(total_steps, 1)
    return (
        f"  step {rec['step']}/{total_steps} ({pct:.0f}%, epoch {min(int(rec['epoch']) + 1, epochs)}"
        f"/{epochs}): loss {rec['loss']:.4f}, lr {rec['lr']:.2e}, "
        f"{_rate(rec['images_per_s'])} img/s"
    )


def epoch_line(rec: Mapping[str, Any], *, epochs: int) -> str:
    """One line per epoch: losses, accuracy, lr, throughput, kept fractions, time, checkpoint."""
    val = f" (val {rec['val_loss']:.4f})" if rec.get("val_loss") is not None else ""
    parts = [f"loss {rec['train_loss']:.4f}{val}", *_metric_parts(rec, "val_")]
    if any(rec.get(f"ema_val_{k}") is not None for k, _ in _METRICS):
        parts.append("EMA " + _metric_parts(rec, "ema_val_")[0])
    parts.append(f"lr {rec['lr']:.2e}")
    if rec.get("images_per_s"):
        parts.append(f"{_rate(rec['images_per_s'])} img/s")
    parts += console_parts(rec)  # each technique's figures, in its own words
    seconds = f"{_duration(rec.get('epoch_time') or 0.0)}"
    if rec.get("eval_time"):
        seconds += f" + {_duration(rec['eval_time'])} eval"
    parts.append(seconds)
    if rec.get("checkpoint"):
        parts.append(f"saved {rec['checkpoint']}")
    return f"epoch {rec['epoch']}/{epochs}: " + ", ".join(parts)


def result_record(result: Any) -> dict[str, Any]:
    """The JSON-ready summary of a :class:`~retrofit.train.loop.RunResult`."""
    return {
        "kind": "result",
        "out": str(result.out) if result.out is not None else None,
        "num_classes": result.num_classes,
        "step": result.step,
        "total_steps": result.total_steps,
        "epoch": result.epoch,
        "epochs": result.config.epochs,
        "completed": result.completed,
        "stop_reason": result.stop_reason,
        "seconds": result.seconds,
        "metrics": dict(result.metrics),
        "weights": str(result.weights) if result.weights is not None else None,
        "checkpoint": str(result.checkpoint) if result.checkpoint is not None else None,
        "lint_findings": len(result.findings),
    }


def finish_lines(result: Mapping[str, Any], resume_hint: str = "resume=True") -> list[str]:
    """The final summary, from :func:`result_record`."""
    m = result.get("metrics") or {}
    head = (
        f"trained {result['step']}/{result['total_steps']} steps "
        f"({result['epoch']}/{result.get('epochs')} epochs) "
        f"in {_duration(result.get('seconds') or 0.0)}"
    )
    if isinstance(m.get("val_top1"), (int, float)):
        head += (
            f": val top-1 {m['val_top1']:.2f}%, top-5 {m['val_top5']:.2f}%, "
            f"val loss {m['val_loss']:.4f}"
        )
    elif _metric_parts(m, "val_"):
        head += ": val " + ", ".join(_metric_parts(m, "val_"))
    lines = [head]
    reason = result.get("stop_reason")
    if reason == "max_steps":
        lines.append("stopped at --max-steps; the weights are those of the last step")
    elif reason:
        lines.append(
            f"stopped by {reason} at step {result['step']}; checkpoint saved: "
            f"continue with {resume_hint}"
        )
    if result.get("weights"):
        lines.append(
            f"weights: {result['weights']} (load into the original class built with "
            f"num_classes={result['num_classes']}, strict)"
        )
    return lines


_DENSE = ("detection", "segmentation")  # their num_classes counts the background
# Each task's evaluation fields (without the val_/ema_val_ prefix) and how a line names them.
_METRICS = (
    ("top1", "top-1"),
    ("top5", "top-5"),
    ("map", "mAP"),
    ("map_50", "AP50"),
    ("miou", "mIoU"),
    ("pixel_acc", "pixel acc"),
)


def _metric_parts(rec: Mapping[str, Any], prefix: str) -> list[str]:
    return [
        f"{label} {rec[prefix + key]:.2f}%"
        for key, label in _METRICS
        if isinstance(rec.get(prefix + key), (int, float))
    ]


def _rate(images_per_s: float) -> str:
    """Whole images per second, or two significant digits below 10 (a detector on a CPU)."""
    return f"{images_per_s:.0f}" if images_per_s >= 10 else f"{images_per_s:.2g}"


def _count(n: Any, noun: str) -> str:
    return f"{n} {_plural(n, noun)}"


def _plural(n: Any, noun: str) -> str:
    return noun if n == 1 else noun + "s"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
