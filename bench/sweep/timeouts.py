"""A time limit on a cell, so that one hung plugin cannot hold a sweep forever.

In this process the limit is an interval timer (SIGALRM) that raises ``CellTimeout`` in the main thread, wherever
the cell is: in Python code, a sleep, or between two torch operations (a single native call that never returns
cannot be interrupted from inside the process; the Ray executor cancels such a task instead). ``CellTimeout``
derives from BaseException, so a plugin's own ``except Exception`` cannot swallow it.
"""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

DEFAULT_CELL_TIMEOUT = 3600.0  # seconds; a suite's `cell_timeout` or `samplerbench run --cell-timeout` changes it


class CellTimeout(BaseException):
    def __init__(self, seconds: float) -> None:
        super().__init__(f"the cell ran past its time limit of {seconds:g} s (cell_timeout in the suite, "
                         f"--cell-timeout on the command line)")
        self.seconds = seconds


def enforceable() -> bool:
    """Whether this process can interrupt itself: an interval timer needs SIGALRM and the main thread."""
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


@contextmanager
def time_limit(seconds: float | None, limit: float | None = None) -> Iterator[None]:
    """Raise CellTimeout in the body after ``seconds`` (None or inf: no limit; outside the main thread the limit
    cannot be enforced and the body runs unlimited). ``limit``: the cell's whole limit, when ``seconds`` is what
    is left of it, for the message."""
    if seconds is None or math.isinf(seconds) or not enforceable():
        yield
        return

    def expire(signum, frame):
        raise CellTimeout(limit if limit is not None else seconds)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
