"""Files and folders written whole or not at all, the digest that checks a file, and safe torch reads.

Every writer here writes a temporary sibling (`.<name>.tmp-<pid>`), fsyncs it and renames it over
the target, so a reader never sees half a file and a crash never replaces a good one. The pid in
the name lets a later run delete the temporaries of a writer that was killed (`remove_dead_temps`).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from src.errors import UserError


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (a process of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by someone else
    return True


class OutputWriteError(UserError, OSError):
    """The OS refused a write (read-only, disk full, an odd path): one line naming the path and the cause.
    Still an OSError, so callers that handle those keep working."""

    def __init__(self, path: Path, cause: OSError, what: str = "") -> None:
        OSError.__init__(self, cause.errno, cause.strerror, cause.filename)
        blocker = next((p for p in Path(path).parents if p.exists() and not p.is_dir()), None)
        reason = f"{blocker} is a file, not a folder" if blocker else (cause.strerror or str(cause))
        self.message = (f"could not write {what}{path} ({reason}); nothing there was changed: free disk space, "
                        "fix its permissions, or choose another path")

    def __str__(self) -> str:
        return self.message


class ForeignOutputError(UserError):
    """An output path that holds something its command did not write: it is never replaced."""


MARKER_TEXT = "This folder was written whole by atari-gan; its next run into this folder replaces it whole.\n"


def check_replaceable(out: Path, marker: str, what: str = "") -> None:
    """Raise ForeignOutputError unless folder `out` may be replaced whole: it is missing, empty, or
    holds `marker` (the file its writer leaves in every folder it writes). `what` prefixes the message
    (e.g. "--out ")."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    where = f"{what}{out}"
    here = Path.cwd().resolve()
    if out.is_symlink() or not out.is_dir():
        raise ForeignOutputError(f"{where} is a {'link' if out.is_symlink() else 'file'}, not a folder this "
                                 "command wrote; it is left alone: choose another path")
    if out.resolve() == here or out.resolve() in here.parents:
        raise ForeignOutputError(f"{where} is the folder this runs in (or holds it); it is left alone: "
                                 "choose a new or empty folder")
    entries = sorted(e.name for e in out.iterdir())
    if entries and marker not in entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ForeignOutputError(f"{where} already holds files this command did not write ({shown}); they are "
                                 "left alone: choose a new or empty folder")


def check_can_create(*paths: Path, what: str = "", folders: bool = False) -> None:
    """Refuse, before any work, paths that cannot be written: under a file, a file where `folders` are
    written, or in a folder this process may not write in (OutputWriteError naming the path and the
    cause). Creates nothing."""
    for path in map(Path, paths):
        if folders and path.exists() and not path.is_dir():
            raise OutputWriteError(path, NotADirectoryError(20, f"{path} is a file, not a folder"), what)
        if path.exists() and not os.access(path, os.W_OK):
            raise OutputWriteError(path, PermissionError(13, "permission denied"), what)
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise OutputWriteError(path, NotADirectoryError(20, f"{parent} is a file, not a folder"), what)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputWriteError(path, PermissionError(13, f"cannot write in {parent}: permission denied"), what)


def _fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes the renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; on success it is fsynced and renamed over `path`.

    `suffix` ends the temporary name (e.g. ".png" for writers that pick a format by extension).
    On failure the temporary is deleted and `path` is left as it was.
    """
    path = Path(path)
    stem = path.stem if suffix else path.name
    tmp = path.with_name(f".{stem}.tmp-{os.getpid()}{suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        _fsync_path(tmp)
        os.replace(tmp, path)
    except OutputWriteError:
        raise
    except OSError as exc:
        raise OutputWriteError(path, exc) from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: Path, payload: Any) -> None:
    """JSON, indented with sorted keys and a final newline."""
    write_bytes_atomic(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def write_csv_atomic(path: Path, fields: list[str], rows: list[dict[str, Any]]) -> None:
    """`rows` as CSV with a header of `fields` (other keys of a row are left out)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(path, out.getvalue().encode())


def save_torch_atomic(path: Path, payload: Any) -> None:
    import torch

    with replacing(path) as tmp, open(tmp, "wb") as fh:
        # A file object, not a name: torch names the archive inside after the file, here a temporary.
        torch.save(payload, fh)


class UnsafeFileError(Exception):
    """A torch file that holds more than tensors and plain data (or is no torch file): it was not loaded."""


def load_torch_plain(path: Path) -> Any:
    """`torch.load` of tensors and plain data only (`weights_only=True`): a pickled object that would
    run code on loading is refused, not run. Raises UnsafeFileError with a one-line reason."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        # torch's message is long and suggests allow-listing; what it refused is the part that matters.
        named = re.search(r"GLOBAL ([\w.]+)", text)
        if "Weights only load failed" in text and named:
            raise UnsafeFileError(f"it holds objects other than tensors and plain data ({named.group(1)}), "
                                  "which could run code on loading") from None
        detail = re.search(r"Unsupported [^\n]*", text)
        reason = detail.group(0) if detail else f"{type(exc).__name__}: {(text.strip().splitlines() or [''])[0]}"
        raise UnsafeFileError(f"it is not a readable file of tensors and plain data ({reason[:200]})") from None


def remove_dead_temps(out: Path) -> None:
    """Delete temporary siblings of `out` left by writers that were killed (their pid is gone)."""
    out = Path(out)
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def replacing_dir(out: Path, marker: str | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces folder `out` as a whole.

    The previous folder is removed only after the new one is in place; on failure the temporary
    folder is deleted and `out` is left as it was. Temporaries of killed writers are removed first.
    With a `marker` (a file name), a folder `out` that holds anything but that writer's own earlier
    output is refused (`check_replaceable`), and the new folder gets the marker.
    """
    out = Path(out)
    if marker is not None:
        check_replaceable(out, marker)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temps(out)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        if marker is not None:
            (tmp / marker).write_text(MARKER_TEXT)
        yield tmp
        _fsync_path(tmp)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        _fsync_path(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)  # the new folder never arrived: the previous one goes back
        if isinstance(exc, OSError) and not isinstance(exc, OutputWriteError):
            raise OutputWriteError(out, exc) from exc
        raise
