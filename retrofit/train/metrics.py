"""Accuracy counts and the ``metrics.jsonl`` log.

``metrics.jsonl`` holds one JSON object per line, ``"kind": "step"`` every ``log_every`` optimizer
steps and ``"kind": "epoch"`` after each evaluation. Everything in it except the wall-clock fields
(:data:`TIMING_KEYS`) is a deterministic function of the recipe and seed on CPU, which is what the
resume test compares.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

TIMING_KEYS = frozenset({"images_per_s", "time", "epoch_time", "eval_time"})


def correct_counts(logits: torch.Tensor, target: torch.Tensor, ks: Iterable[int]) -> torch.Tensor:
    """Number of samples whose target is among the top-k logits, for each k (a float tensor)."""
    ks = list(ks)
    kmax = min(max(ks), logits.shape[-1])
    top = logits.topk(kmax, dim=-1).indices
    hit = top.eq(target.view(-1, 1))
    return torch.stack([hit[:, : min(k, kmax)].any(dim=1).sum() for k in ks]).float()


def jsonable(x: Any) -> Any:
    """Tensors and numpy scalars to plain floats/lists, NaN/inf to None (JSON has no NaN)."""
    if isinstance(x, torch.Tensor):
        x = x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        with contextlib.suppress(TypeError, ValueError):  # numpy arrays of many elements
            x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def require_tensorboard() -> None:
    """Raise RecipeError unless TensorBoard logging can work (checked before a run writes anything)."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        from retrofit.errors import RecipeError

        raise RecipeError(
            "train.tensorboard",
            True,
            "false unless the tensorboard package is installed",
            "pip install 'retrofit[tensorboard]'",
        )


class MetricsLog:
    """Append-only JSON-lines writer; a no-op on non-zero ranks (``path=None``).

    With ``tensorboard_dir`` every numeric field is also written as a TensorBoard scalar
    (``step/loss``, ``epoch/val_top1``, …) against the optimizer step.
    """

    def __init__(
        self,
        path: str | Path | None,
        *,
        resume_step: int | None = None,
        tensorboard_dir: str | Path | None = None,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.records: list[dict[str, Any]] = []
        self._tb = None
        if self.path is None:
            return
        if tensorboard_dir is not None:
            require_tensorboard()
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(tensorboard_dir))
        if resume_step is not None and self.path.is_file():
            # Records past the checkpoint belong to steps that will be run again: drop them, so the
            # resumed log is the uninterrupted run's log, line for line.
            self.records = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        from retrofit.train.checkpoint import atomic_write_bytes

        # Atomic: a full disk here must not cost the records of the steps already run.
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def write(self, record: Mapping[str, Any]) -> dict[str, Any]:
        rec = jsonable(dict(record))
        self.records.append(rec)
        if self.path is not None:
            _append_line(self.path, json.dumps(rec) + "\n")
        if self._tb is not None:
            for key, value in rec.items():
                if key not in ("kind", "step") and isinstance(value, (int, float)):
                    self._tb.add_scalar(
                        f"{rec.get('kind', 'run')}/{key}", value, rec.get("step", 0)
                    )
        return rec

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _append_line(path: Path, line: str) -> None:
    """Append one whole line or nothing: a write the disk refuses is cut back to the last full
    line (a torn JSON line would break :func:`read_metrics` on resume)."""
    from retrofit.train.checkpoint import WriteError

    data = line.encode("utf-8")
    with open(path, "ab") as f:
        end = f.tell()
        try:
            f.write(data)
            f.flush()
        except OSError as e:
            f.truncate(end)
            raise WriteError(path, e) from None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a torn last line from a crash is skipped)."""
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def without_timing(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Records minus wall-clock fields: what must be identical between a resumed and a whole run."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]
