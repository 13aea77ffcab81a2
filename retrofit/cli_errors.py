"""The command line's error boundary: every failure becomes an exit code and one line on stderr.

Exit codes (the README's "Failure behaviour" section):

====  =========================================================================================
0     done
1     lint findings (``lint``; ``--train --strict-lint`` refused to train) — and nothing else
2     bad input: flags, recipe, model name / factory / kwargs, weights, checkpoint, data, device,
      output directory (a file, in use by another run, not empty), or a write the operating
      system refused (disk full, quota, read-only); nothing half-written is left
3     retrofit refused the model: it cannot be traced, or the rewrite would change its output
70    internal error (a bug in retrofit): one line, and the full traceback saved to a file
      (``EX_SOFTWARE`` in BSD's sysexits.h)
130   interrupted by SIGINT (128 + 2); a training run saved its checkpoint first
143   interrupted by SIGTERM (128 + 15); a training run saved its checkpoint first
====  =========================================================================================

Bad input is one line ``retrofit-cli: error: <the thing>: <what is wrong>; <what is allowed>``,
never a traceback. ``--debug`` (or ``RETROFIT_DEBUG=1``) prints the traceback as well.

This module imports neither torch nor the trainer, so the CLI's ``--help`` stays instant. The
exception classes it maps live next to what they validate (the recipe, model names, data, the
run directory, devices, checkpoints); a class whose module was never imported cannot have been
raised, so each is looked up in ``sys.modules`` only when an error is being classified.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_FINDINGS",
    "EXIT_INTERNAL",
    "EXIT_OK",
    "EXIT_REFUSED",
    "ArgumentParser",
    "BadInput",
    "LintFailed",
    "classify",
    "exit_code_for_signal",
    "run",
]

PROG = "retrofit-cli"
EXIT_OK, EXIT_FINDINGS, EXIT_BAD_INPUT, EXIT_REFUSED = 0, 1, 2, 3
EXIT_INTERNAL = 70
_SIGNAL_CODES = {"SIGINT": 128 + 2, "SIGTERM": 128 + 15}


class BadInput(Exception):
    """A user error found by the CLI itself (flag combinations, flag values)."""


class LintFailed(Exception):
    """``--strict-lint`` refused to train; carries the trainer's message."""


# "module:Class" names, resolved lazily (see the module docstring).
_BAD_INPUT = (
    "retrofit.errors:RecipeError",
    "retrofit.errors:ModelError",
    "retrofit.train.data:DataError",
    "retrofit.train.rundir:RunDirError",
    "retrofit.train.distributed:DeviceError",
    "retrofit.train.checkpoint:WriteError",
)
_REFUSED = ("retrofit.errors:RefusedError",)  # TraceError, RewriteError, VerifyError, PartialError
_FINDINGS = ("retrofit.train.prepare:LintFindingsError",)

# OSErrors a user's paths and machine cause (a missing or unwritable path, a full disk), as
# opposed to OSErrors that would mean a bug.
_USER_ERRNOS = {
    errno.ENOENT,
    errno.EEXIST,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EFBIG,
    errno.ENAMETOOLONG,
    errno.ELOOP,
    errno.ENOTEMPTY,
}


def _classes(names: tuple[str, ...]) -> tuple[type[BaseException], ...]:
    out = []
    for name in names:
        module, _, cls = name.partition(":")
        found = getattr(sys.modules.get(module), cls, None)
        if isinstance(found, type):
            out.append(found)
    return tuple(out)


def one_line(text: str) -> str:
    """Collapse a message onto one line: scripts and CI logs then show the whole reason."""
    return " ".join(str(text).split())


def classify(e: BaseException) -> tuple[int, str] | None:
    """``(exit code, message)`` for a failure the user caused or can fix; None for a bug."""
    if isinstance(e, (LintFailed, *_classes(_FINDINGS))):
        return EXIT_FINDINGS, one_line(str(e))
    if isinstance(e, (BadInput, *_classes(_BAD_INPUT))):
        return EXIT_BAD_INPUT, one_line(str(e) or type(e).__name__)
    if isinstance(e, _classes(_REFUSED)):
        return EXIT_REFUSED, one_line(str(e) or type(e).__name__)
    if isinstance(e, OSError) and e.errno in _USER_ERRNOS:
        return EXIT_BAD_INPUT, _os_error_line(e)
    if type(e).__name__ == "OutOfMemoryError" and type(e).__module__.startswith("torch"):
        return EXIT_BAD_INPUT, one_line(
            f"out of device memory ({_first_line(e)}); lower train.batch_size (--batch-size) "
            "or train.img_size"
        )
    return None


def _os_error_line(e: OSError) -> str:
    what = e.strerror or str(e)
    if isinstance(e, FileNotFoundError) and e.filename:
        return one_line(f"no such file or directory: {e.filename}")
    if e.filename is not None:
        where = repr(str(e.filename))
        if e.filename2 is not None:
            where += f" -> {str(e.filename2)!r}"
        return one_line(f"{where}: {what}")
    return one_line(what)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def exit_code_for_signal(name: str | None) -> int:
    """130 for SIGINT, 143 for SIGTERM (128 + the signal number, as shells report it)."""
    return _SIGNAL_CODES.get(name or "", 128 + 2)


def debug_requested(args: Any = None) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("RETROFIT_DEBUG", "") not in (
        "",
        "0",
    )


def run(command: Callable[[], int], *, debug: bool = False, prog: str = PROG) -> int:
    """Run a CLI command; map every exception to an exit code and one line on stderr.

    Args:
        command: the command; returns its own exit code when it does not raise.
        debug: also print the full traceback of any failure (``--debug``).
        prog: the name in front of each message.
    """
    try:
        return command()
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(
            f"{prog}: interrupted (SIGINT); files already written are complete (a training run's "
            "last checkpoint is intact: continue it with --resume)",
            file=sys.stderr,
        )
        return _SIGNAL_CODES["SIGINT"]
    except Exception as e:
        if debug:
            traceback.print_exc()
        known = classify(e)
        if known is not None:
            code, text = known
            print(f"{prog}: error: {text}", file=sys.stderr)
            return code
        if debug:
            tail = "full traceback above"
        else:
            where = _save_traceback(e)
            tail = f"full traceback in {where}" if where else "rerun with --debug for the traceback"
        print(
            f"{prog}: internal error: {one_line(_first_line(e))} ({type(e).__name__}); "
            f"not a failure retrofit expects, so likely a bug: please report it; {tail}",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def _save_traceback(e: BaseException) -> str | None:
    """Write the traceback to a fresh file in the temp directory; its path, or None."""
    try:
        fd, path = tempfile.mkstemp(prefix="retrofit-cli-", suffix=".traceback.txt")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"{PROG} {' '.join(sys.argv[1:])}\n")
            f.write(time.strftime("%Y-%m-%d %H:%M:%S %z\n\n"))
            f.write("".join(traceback.format_exception(type(e), e, e.__traceback__)))
        return path
    except OSError:  # a full disk: the line still says how to see it
        return None


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors and a ``--debug`` flag on every parser.

    argparse prints its whole usage block before an error; scripts and CI logs then show a
    wall of options instead of the reason. Here an error is one line that names the flag and
    points to ``--help``; the exit code stays argparse's 2 (bad input).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument(
            "--debug",
            action="store_true",
            help="on a failure, print the full Python traceback (also: RETROFIT_DEBUG=1)",
        )

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")
