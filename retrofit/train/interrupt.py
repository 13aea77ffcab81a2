"""SIGINT/SIGTERM → "stop after this step": the loop saves a checkpoint and returns cleanly.

Schedulers (SLURM, Kubernetes, torchrun's agent) send SIGTERM before killing a job; Ctrl-C sends
SIGINT. Either only sets a flag, so the optimizer step in flight completes and the checkpoint is
consistent. A second SIGINT restores Python's default and raises KeyboardInterrupt at once, for a
user who does not want to wait.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType


class StopRequest:
    """Context manager that turns SIGINT/SIGTERM into ``self.requested = True``.

    Outside the main thread signal handlers cannot be installed; the flag then only changes if
    the caller sets it.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
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
