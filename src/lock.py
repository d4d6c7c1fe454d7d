"""One writer per project: an OS lock on `.atari-gan.lock` in the folder a stage runs in.

Every stage that writes project outputs (collect, train, evaluate, sample into the project, tune)
holds it while it works. `fcntl.flock` is released by the kernel when the holder's process ends,
however it ends (SIGKILL too), so a stale lock never needs deleting. A second command refuses at
once, naming the holders' PIDs and commands (from the kernel's /proc/locks; each holder also writes
its own into the file, read where there is no /proc).

The folder is the working directory, not `src.paths.repo_root()`: `dvc exp run --queue` runs each
experiment in its own copy under `.dvc/tmp/exps/`, and those must keep running side by side.
Under torchrun only global rank 0 (env `RANK`) takes it. Tune workers take it shared: several
may work on one study together, while no other stage writes beside them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from src.errors import UserError

LOCK_FILE = ".atari-gan.lock"


class ProjectLocked(UserError):
    """Another command holds the project's lock."""


def holder_line() -> str:
    """This process as the lock file names it: `PID 123: python -m src.train`."""
    command = " ".join(" ".join(getattr(sys, "orig_argv", sys.argv)).split())  # one line, however it was started
    return f"PID {os.getpid()}: {command[:300]}"


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except PermissionError:
        # A lock file we may only read still locks (flock works on any open file).
        with contextlib.suppress(OSError):
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        raise


def _holders(fd: int) -> list[str]:
    """`PID n: command` of each process holding the lock on open file `fd`, from the kernel's /proc/locks
    (exact even when several tune workers share it); [] where there is no /proc."""
    stat = os.fstat(fd)
    key = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    holders = []
    for fields in (line.split() for line in lines):
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; a waiter's line has "->" after the number
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == key and fields[4].isdigit():
            try:
                argv = Path(f"/proc/{fields[4]}/cmdline").read_bytes().split(b"\0")
                command = " ".join(" ".join(a.decode(errors="replace") for a in argv).split())
            except OSError:
                command = "?"
            holders.append(f"PID {fields[4]}: {command[:300]}")
    return holders


@contextlib.contextmanager
def project_lock(folder: Path | None = None, *, shared: bool = False) -> Iterator[Path | None]:
    """Hold the lock of project `folder` (default: the working directory) while the block runs.

    Raises ProjectLocked, without waiting, when another process holds it (exclusively, or shared
    while this one wants it exclusive). Yields the lock file's path (None on a rank other than 0).
    """
    if os.environ.get("RANK", "0") != "0":
        yield None
        return
    path = Path(folder or Path.cwd()) / LOCK_FILE
    try:
        fd = _open(path)
    except OSError as exc:
        raise UserError(f"cannot create the project lock {path} ({exc.strerror}): run in a project folder "
                        "you may write to") from None
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = "; ".join(_holders(fd)) or " ".join(os.pread(fd, 4096, 0).decode(errors="replace").split())
            raise ProjectLocked(f"another command is writing in this project ({holder}; lock {path}); wait "
                                "for it to end, or stop it, then run again") from None
        with contextlib.suppress(OSError):  # a read-only lock file still locks; it just names no one
            line = (holder_line() + "\n").encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, line, 0)
        yield path
    finally:
        os.close(fd)  # closing the last descriptor releases the lock
