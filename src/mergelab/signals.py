"""SIGTERM and SIGHUP stop a run the way Ctrl-C does: as an exception, so every cleanup path runs.

Timeouts, batch schedulers and container stops send SIGTERM (a closed terminal sends SIGHUP); Python's
default for both is to die on the spot, leaving a half-written temporary folder beside the output. Raising
:class:`Terminated` instead unwinds through the same ``except BaseException`` cleanups as
``KeyboardInterrupt``; the CLI then exits with 128 + the signal number, as a shell reports a killed job.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

HANDLED = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None)


class Terminated(BaseException):
    """The process received ``signum``. A BaseException (like KeyboardInterrupt) so that ``except
    Exception`` blocks do not swallow it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextmanager
def signals_raise() -> Iterator[None]:
    """While active (main thread only), SIGTERM/SIGHUP raise :class:`Terminated` in the main thread.

    Only the first signal raises: a second one (schedulers often repeat SIGTERM) must not interrupt the
    cleanup that the first one started.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if fired:
            return
        fired.append(signum)
        raise Terminated(signum)

    previous = {s: signal.signal(s, handler) for s in HANDLED}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
