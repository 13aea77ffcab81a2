"""SIGINT/SIGTERM → "stop after this step": the loop saves a checkpoint and returns cleanly.

Schedulers (SLURM, Kubernetes, torchrun's agent) send SIGTERM before killing a job; Ctrl-C sends
SIGINT. Either only sets a flag, so the optimizer step in flight completes and the checkpoint is
consistent. A second SIGINT restores Python's default and raises KeyboardInterrupt at once, for a
user who does not want to wait. Under torchrun a Ctrl-C reaches every worker twice: from the
terminal (the whole foreground process group) and, a moment later, from torchrun's agent, which
forwards the signal it got to its workers; a repeat within :data:`TORCHRUN_ECHO_S` is that echo,
not a second request, so the step still completes and the checkpoint is saved on every rank.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType, TracebackType

# How long after a SIGINT torchrun's forwarded copy of it may arrive (the agent forwards at once;
# the margin covers a loaded machine).
TORCHRUN_ECHO_S = 2.0


class StopRequest:
    """Context manager that turns SIGINT/SIGTERM into ``self.requested = True``.

    Outside the main thread signal handlers cannot be installed; the flag then only changes if
    the caller sets it.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}
        self._first_at = 0.0
        self._under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            if self._under_torchrun and time.monotonic() - self._first_at < TORCHRUN_ECHO_S:
                return  # the agent's copy of the same Ctrl-C
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        if not self.requested:
            self._first_at = time.monotonic()
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
