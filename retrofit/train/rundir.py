"""The run directory (``--out``): checked before any work, locked while a run writes in it.

Three guarantees, each cheap, together "nothing mixed, nothing left over":

- :func:`check_out_dir` refuses a directory that cannot be a run directory *before* a model is
  built: its path runs through a file, it is a file, it is not writable, or (a new run) it
  already holds files. The error names the path and what would be accepted.
- :func:`lock_run_dir` holds an exclusive advisory lock (``flock``) on the directory itself while
  a run writes there, so a second run into the same directory refuses at once instead of
  interleaving its files. Locking the directory, not a lock file, leaves nothing behind; the
  kernel drops the lock when the process ends, even by ``kill -9``, so a crashed run never
  blocks the next one. The lock is re-entrant within a process (the CLI takes it around
  :func:`retrofit.train.fit`, which takes it too).
- On taking the lock, the temp files that killed atomic writes left behind
  (``.checkpoint.pt.tmp-PID``, see :mod:`retrofit.train.checkpoint`) are removed: under the lock no
  other process writes there, so every such file is stale. A run that fails before its first
  checkpoint, in a directory that was empty when it took the lock, removes what it wrote (there
  is nothing to resume), and the directory itself if the lock created it.

Platforms without ``fcntl`` (Windows) get the checks and the cleanup but no lock.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from retrofit.train.checkpoint import CHECKPOINT_NAME, is_temp_name

try:  # pragma: no cover - always present on POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "RunDirError",
    "check_out_dir",
    "lock_run_dir",
    "remove_stale_temps",
    "writes_run_dir",
]

# realpath -> [fd, depth] for the locks this process holds (re-entrancy).
_HELD: dict[str, list[int]] = {}


class RunDirError(ValueError):
    """The output directory cannot be used: the message names it and what would be accepted."""


def writes_run_dir() -> bool:
    """Whether this process is the one that checks, locks and writes ``--out``.

    Under torchrun every process runs the same command, and rank 0 alone writes the run
    directory (:func:`retrofit.train.fit`); the others only read a checkpoint from it when
    resuming. Read from torchrun's ``RANK`` (what the process group will report), so the CLI
    can decide before importing torch. A process outside torchrun is rank 0.
    """
    return int(os.environ.get("RANK", "0") or 0) == 0


def _first_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_out_dir(out: str | Path, *, resume: bool = False) -> Path:
    """Refuse an ``--out`` that cannot be (or, for a new run, must not be) a run directory.

    Args:
        out: the directory.
        resume: a run continues there: an existing directory with files is expected.

    Raises:
        RunDirError: a component of the path is a file; ``out`` is a file; the nearest existing
            directory is not writable; or, unless ``resume``, ``out`` holds files.
    """
    out = Path(out)
    where = f"--out {str(out)!r}"
    if out.exists() and not out.is_dir():
        hint = "; --resume continues a run directory" if resume else ""
        raise RunDirError(f"{where} is a file, not a directory; choose a directory{hint}")
    base = _first_existing(out.absolute())
    if not base.is_dir():
        raise RunDirError(
            f"{where}: {str(base)!r} is a file, so nothing can be created under it; "
            "choose a path inside a directory"
        )
    if not os.access(base, os.W_OK | os.X_OK):
        raise RunDirError(f"{where}: {str(base)!r} is not writable by this user")
    if not resume and out.is_dir() and _entries(out):
        raise RunDirError(
            f"{where} exists and is not an empty directory; choose a new one "
            "(with --train, --resume continues the run in it)"
        )
    return out


def _entries(out: Path) -> list[str]:
    """The directory's entries, stale temp files aside (they do not make it a run)."""
    return [p.name for p in out.iterdir() if not is_temp_name(p.name)]


def remove_stale_temps(out: str | Path) -> list[str]:
    """Delete the temp files of atomic writes that never finished (a killed process's).

    Only call it while holding :func:`lock_run_dir`: a live writer's temp file looks the same.
    Returns the names removed.
    """
    removed = []
    for p in Path(out).iterdir():
        if is_temp_name(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


@contextlib.contextmanager
def lock_run_dir(out: str | Path | None, *, fresh: bool = False) -> Iterator[Path | None]:
    """Hold ``out`` for one run: create it, lock it, remove stale temp files; undo on failure.

    Args:
        out: the run directory (created if missing); None is a no-op (a run that writes nothing).
        fresh: a new run: refuse, once locked, if another run has written files there since
            :func:`check_out_dir` looked (the window between the CLI's early check and the lock).

    Raises:
        RunDirError: ``out`` cannot be created, another process holds its lock, or ``fresh`` and
            it holds files.
    """
    if out is None:
        yield None
        return
    out = Path(out)
    key = os.path.realpath(out)
    if key in _HELD:  # this process already holds it (the CLI around fit)
        _HELD[key][1] += 1
        try:
            yield out
        finally:
            _HELD[key][1] -= 1
        return
    check_out_dir(out, resume=not fresh)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"--out {str(out)!r} cannot be created: {e.strerror or e}") from None
    fd = _lock(out)
    _HELD[key] = [fd, 1]
    was_empty = False
    try:
        remove_stale_temps(out)
        if fresh and _entries(out):
            raise RunDirError(
                f"--out {str(out)!r}: another run wrote {_entries(out)[:3]} there while this one "
                "was starting; choose a new directory"
            )
        was_empty = not _entries(out)
        yield out
    except BaseException:
        if was_empty and not (out / CHECKPOINT_NAME).exists():
            # Empty when locked, so every file is this run's; without a checkpoint nothing can
            # resume from them: a run that failed leaves no half-written directory behind.
            _remove_contents(out)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only succeeds while empty: a failed start leaves nothing behind
        raise
    finally:
        del _HELD[key]
        if fd >= 0:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _remove_contents(out: Path) -> None:
    for p in out.iterdir():
        with contextlib.suppress(OSError):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


def _lock(out: Path) -> int:
    if fcntl is None:  # pragma: no cover - Windows: no advisory locks on directories
        return -1
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise RunDirError(
            f"--out {str(out)!r} is in use by another retrofit run (its lock is held); wait for "
            "that run to end or choose another directory"
        ) from None
    return fd
