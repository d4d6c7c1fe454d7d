"""Where a stage's time went: named wall-clock sections, summed, for the one-line breakdown each stage ends with."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


class Stopwatch:
    """Accumulates seconds per named section (`with watch.section("fid"): ...`), in first-use order."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def rounded(self) -> dict[str, float]:
        return {name: round(s, 1) for name, s in self.seconds.items()}

    def summary(self) -> str:
        """`time: data 2.1 s · training 301.0 s · fid 80.2 s (total 383.3 s)`."""
        parts = " · ".join(f"{name} {s:.1f} s" for name, s in self.seconds.items())
        return f"time: {parts} (total {sum(self.seconds.values()):.1f} s)"
