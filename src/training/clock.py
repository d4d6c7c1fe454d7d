"""When training stops: the clock of training seconds, the lr and gamma schedules it drives, and stop signals.

Stop requests (signals, time budget) are agreed on by all ranks at the next sync point.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

from src.timing import Stopwatch

log = logging.getLogger(__name__)


class StopRequest:
    """SIGINT/SIGTERM set a flag the loop reads between steps; a second signal stops at once."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: stopping after this step and writing a checkpoint", signal.Signals(signum).name)

    @contextlib.contextmanager
    def installed(self, enabled: bool) -> Iterator[StopRequest]:
        if not enabled or threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in old:
            signal.signal(s, self._handler)
        try:
            yield self
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)


class Clock:
    """Training seconds: wall time since start plus earlier sessions, minus paused work (timed by name)."""

    def __init__(self, before: float):
        self.before = before
        self.start = time.perf_counter()
        self.paused = Stopwatch()

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.start - sum(self.paused.seconds.values())

    def pause(self, name: str) -> contextlib.AbstractContextManager[None]:
        return self.paused.section(name)


def done_fraction(step: int, iterations: int, elapsed_s: float, budget_s: float | None) -> float:
    """How far the run is, 0 to 1, towards whichever end comes first: the iteration count or the time budget."""
    done = step / iterations
    if budget_s is not None:
        done = max(done, elapsed_s / budget_s)
    return min(1.0, done)


def lr_scale(step: int, iterations: int, elapsed_s: float, budget_s: float | None) -> float:
    """Linear decay: 1 at the start, 0 at whichever end comes first, the iteration count or the time budget.

    Under a time budget the schedule follows the clock, so a slower machine decays over fewer steps.
    """
    return 1.0 - done_fraction(step, iterations, elapsed_s, budget_s)


def cosine_scale(done: float, end: float) -> float:
    """A half cosine from 1 at the start (done = 0) to `end` at the end (done = 1): R3GAN's decay of gamma."""
    return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * done))
