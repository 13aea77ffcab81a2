"""Checkpoints, RNG state and weight files: written atomically, read without executing code.

Atomic write: serialise into a temporary file in the *same directory*, flush and ``fsync`` it,
then ``os.replace`` it over the target (a rename is atomic within one filesystem) and ``fsync``
the directory so the rename itself survives a power loss. A process killed at any point leaves
either the old file or the new one, never a torn one; the temp file is removed on error. A
``kill -9`` cannot run that cleanup: its temp file (``.NAME.tmp-PID``, :func:`is_temp_name`) is
removed when the next run takes the directory (:mod:`retrofit.train.rundir`). A write that fails
in the operating system (a full disk, a quota, a read-only mount) raises :class:`WriteError`,
which names the file and leaves the previous version in place.

Reading: checkpoints with ``torch.load(..., weights_only=True)`` (no pickled code runs), weights
from safetensors or such a state_dict. To keep checkpoints loadable that way, RNG states are
stored as tensors and plain tuples, never as numpy objects.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import nn

from retrofit.errors import ModelError
from retrofit.weights import FORMAT

CHECKPOINT_NAME = "checkpoint.pt"
WEIGHTS_NAME = "model.safetensors"
VERSION = 1
REQUIRED_KEYS = ("model", "optimizer", "step", "epoch", "batch_in_epoch", "num_classes", "per_rank")


_TEMP_RE = re.compile(r"^\..+\.tmp-\d+$")


class ResumeError(ModelError):
    """A checkpoint whose run cannot be continued by this one (another number of processes and
    another global batch). ``launch`` is ``(launcher, entry)`` of the run that wrote it (None:
    a single process without a launcher); ``batch_size``, when not None, is the per-process
    batch that would continue it with this run's number of processes."""

    def __init__(
        self,
        message: str,
        *,
        launch: tuple[list[str], list[str]] | None = None,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(message)
        self.launch = launch
        self.batch_size = batch_size


class WriteError(OSError):
    """The operating system refused a write (disk full, quota, read-only, permission).

    Raised by :func:`atomic_write` once its temp file is removed: the target still holds its
    previous version (or does not exist). ``errno``, ``strerror`` and ``filename`` are the
    OSError's, so callers can tell a full disk (``errno.ENOSPC``) from the rest.
    """

    def __init__(self, path: Path, cause: OSError) -> None:
        code = cause.errno if cause.errno is not None else errno.EIO
        reason = cause.strerror or str(cause) or type(cause).__name__
        super().__init__(code, reason, str(path))

    def __str__(self) -> str:
        name = Path(str(self.filename)).name
        return (
            f"cannot write {str(self.filename)!r}: {self.strerror}; nothing partial was left "
            f"(the previous {name}, if there was one, is intact)"
        )


def temp_path(path: Path) -> Path:
    """Where :func:`atomic_write` stages ``path``: a hidden sibling that names the writer's pid."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of :func:`atomic_write`'s temp files (``.NAME.tmp-PID``)."""
    return bool(_TEMP_RE.match(name))


def _os_error_in(e: BaseException) -> OSError | None:
    """The OSError behind ``e``: torch.save reports a failed write as a RuntimeError whose
    context is the OSError the file object raised."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
        seen += 1
    return None


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temp file beside ``path``, then atomically move it to ``path``.

    Raises:
        WriteError: the operating system refused the write (the temp file is removed first).
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        # BaseException: a KeyboardInterrupt mid-write must not leave the temp file behind either.
        with contextlib.suppress(OSError):  # the directory itself may have gone
            tmp.unlink(missing_ok=True)
        real = isinstance(e, Exception) and not isinstance(e, WriteError)
        cause = _os_error_in(e) if real else None
        if cause is not None:
            raise WriteError(path, cause) from e
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes | str) -> Path:
    """:func:`atomic_write` for content already in memory (text is written as UTF-8)."""
    blob = data.encode("utf-8") if isinstance(data, str) else data
    return atomic_write(path, lambda f: f.write(blob))


def _serialize(obj: Any, f: IO[bytes]) -> None:
    torch.save(obj, f)


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> Path:
    """Atomically write a training checkpoint (see :func:`make_checkpoint`)."""
    return atomic_write(path, lambda f: _serialize(dict(state), f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (weights_only: no code executes).

    Raises:
        ModelError: the file is missing, unreadable, or not a retrofit training checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {str(path)!r}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(
            f"checkpoint {str(path)!r} cannot be read as a weights-only torch file ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ModelError(
            f"checkpoint {str(path)!r} is not a retrofit training checkpoint (no format={FORMAT!r}); "
            "to start from plain weights, load them into the model instead of resuming"
        )
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ModelError(f"checkpoint {str(path)!r} is incomplete: no {', '.join(missing)}")
    return state


# ---------------------------------------------------------------- RNG state


def capture_rng(device: torch.device | None = None) -> dict[str, Any]:
    """The RNG states a training step can draw from: torch CPU (+ CUDA), numpy, Python."""
    name, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": _plain(random.getstate()),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: Mapping[str, Any], device: torch.device | None = None) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device is not None and device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _plain(x: Any) -> Any:
    if isinstance(x, (tuple, list)):
        return tuple(_plain(v) for v in x)
    return x


def export_weights(
    model: nn.Module, out_dir: str | Path, meta: Mapping[str, Any], name: str = WEIGHTS_NAME
) -> Path:
    """Write ``model``'s state_dict as safetensors (+ ``model.json`` with ``meta``), atomically."""
    from safetensors.torch import save

    out_dir = Path(out_dir)
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for k, v in model.state_dict().items():
        # safetensors refuses tensors that share storage; copy tied weights so each key stands alone.
        v = v.detach().cpu()
        key = v.untyped_storage().data_ptr() if v.numel() else -1
        tensors[k] = v.clone().contiguous() if key in seen else v.contiguous()
        if v.numel():
            seen[key] = k
    str_meta = {"format": "pt", **{k: json.dumps(v) for k, v in meta.items()}}
    path = atomic_write(out_dir / name, lambda f: f.write(save(tensors, metadata=str_meta)))
    if name == WEIGHTS_NAME:
        atomic_write(
            out_dir / "model.json", lambda f: f.write(json.dumps(dict(meta), indent=2).encode())
        )
    return path
