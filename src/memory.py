"""How much memory this machine gives a process, and the one refusal of a size that cannot fit in it.

A count in params.yaml or on a command line (images to draw, filters per layer) can ask for more
memory than the machine has; the allocator then fails deep inside torch with a traceback. Callers
compute the bytes they are about to allocate and call `check_fits` first, so the user gets one line
naming the size, the limit and the setting to lower.
"""

from __future__ import annotations

import os
from pathlib import Path

from src.errors import UserError

CGROUP_LIMIT_FILES = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


class MemoryFitError(UserError):
    pass


def memory_limit_bytes() -> int:
    """Physical memory, or the container's (cgroup) limit when that is lower."""
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in CGROUP_LIMIT_FILES:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            limit = min(limit, int(text))
    return limit


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def check_fits(nbytes: int, what: str, fix: str) -> None:
    """Raise MemoryFitError (before anything is allocated) when `nbytes` exceed this machine's memory.

    `what` names the allocation ("64,000,000 images of 12,288 B"), `fix` the setting to lower.
    """
    limit = memory_limit_bytes()
    if nbytes > limit:
        raise MemoryFitError(f"{what} need {human_bytes(nbytes)}, more than this machine's {human_bytes(limit)} "
                             f"of memory; {fix}")
