"""The worker side of `collect`: play one shard with a random agent, and the frame file it plays into.

A worker process keeps one env per (split, game) and reseeds it for each shard: a reset with a seed
reloads the ROM and reseeds the emulator, so a reused env plays exactly what a fresh one would.
Each frame is resized to 64x64 here, passed through the article's dark-frame test (on the small
frame) and, with dedup, hashed (`frame_digests` hashes stored frames the same way). The first kept
frames go straight into the run's shared frame file (`frame_file`), so no frame is sent between
processes. `worker_pool` starts the worker processes; `env_info` and `library_versions` record
what played. Planning and merging the shards is src/collect.py's.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
import platform
import select
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import ale_py
import cv2
import gymnasium as gym
import numpy as np

# Spawned workers import this module: torch and pydantic stay out of the module level.
from src.atomic import pid_alive
from src.errors import UserError

SIZE = 64
FRAME_SHAPE = (3, SIZE, SIZE)
INTERPOLATIONS = {
    "linear": cv2.INTER_LINEAR,  # cv2.resize's default, what the article's wrapper uses
    "area": cv2.INTER_AREA,
    "nearest": cv2.INTER_NEAREST,
    "cubic": cv2.INTER_CUBIC,
}


class CollectError(UserError):
    pass


@dataclass(frozen=True, eq=False)
class ShardTask:
    """One unit of work: `steps` env steps of `game` from `env.reset(seed=seed)`.

    With a `sink` (the path of the run's shared frame file), the worker writes its first kept
    frames straight into rows `slots` of that file and returns only the frames beyond them;
    without one, it returns all its frames.
    """

    split: str
    game_index: int
    index: int
    game: str
    seed: int
    steps: int
    interpolation: str
    min_mean: float
    hash_frames: bool
    sink: str | None = None
    slots: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))


@dataclass
class ShardResult:
    task: ShardTask
    kept: int  # frames that passed the dark-frame filter, in play order
    frames: np.ndarray  # (n, 3, 64, 64) uint8: the kept frames from number len(task.slots) on
    hashes: list[bytes]  # sha256 of each kept frame (empty when dedup is off)
    dark: int  # frames the dark-frame filter dropped


# Per-process state, kept across shards: envs (a new one costs a second ROM load) and the mapped sink.
_envs: dict[tuple[str, str], gym.Env] = {}
_sinks: dict[str, np.ndarray] = {}


def worker_env(split: str, game: str) -> gym.Env:
    """This process's env for (split, game), made on first use; train and holdout never share one."""
    env = _envs.get((split, game))
    if env is None:
        gym.register_envs(ale_py)
        ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)  # no banner from every worker
        env = _envs[(split, game)] = gym.make(game)
    return env


def release_worker_state() -> None:
    """Close this process's envs and drop its sink mapping."""
    for env in _envs.values():
        env.close()
    _envs.clear()
    _sinks.clear()


def _sink(path: str) -> np.ndarray:
    if path not in _sinks:
        _sinks.clear()  # another run's file
        _sinks[path] = np.memmap(path, np.uint8, "r+").reshape(-1, *FRAME_SHAPE)
    return _sinks[path]


def run_shard(task: ShardTask) -> ShardResult:
    """Play one shard with a random agent; resize, filter and (optionally) hash every frame.

    The frames depend only on the task: the same task gives the same frames in any process, on
    a fresh env or on one that played other shards before.
    """
    interpolation = INTERPOLATIONS[task.interpolation]
    threshold = task.min_mean * 3  # cv2.mean gives one mean per channel: compare their sum
    rows = task.slots.tolist()
    sink = _sink(task.sink) if rows else None
    frame = np.empty((SIZE, SIZE, 3), np.uint8)
    extra: list[np.ndarray] = []  # kept frames with no row planned for them
    hashes: list[bytes] = []
    kept = 0
    env = worker_env(task.split, task.game)
    # Both seeds are needed for a reproducible rollout: reset(seed) seeds the game, action_space.seed the agent.
    env.reset(seed=task.seed)
    env.action_space.seed(task.seed)
    for _ in range(task.steps):
        obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
        cv2.resize(obs, (SIZE, SIZE), dst=frame, interpolation=interpolation)
        # The article's np.mean(obs) > 0.01, taken on the 64x64 frame: cv2.mean there costs
        # ~1 us where np.mean on the raw frame costs ~40 us.
        m = cv2.mean(frame)
        if m[0] + m[1] + m[2] > threshold:
            if task.hash_frames:
                hashes.append(hashlib.sha256(frame).digest())
            chw = frame.transpose(2, 0, 1)  # HWC -> CHW here, in parallel, as the frame is copied out
            if kept < len(rows):
                sink[rows[kept]] = chw
            else:
                extra.append(chw.copy())
            kept += 1
        if terminated or truncated:
            env.reset()
    frames = np.stack(extra) if extra else np.empty((0, *FRAME_SHAPE), np.uint8)
    return ShardResult(task=task, kept=kept, frames=frames, hashes=hashes, dark=task.steps - kept)


def die_with(pid: int) -> None:
    """End this process at once when process `pid` ends, however it ends (SIGKILL too).

    A killed collect runs no clean-up. Its workers are children of the forkserver, not of collect,
    and both hold each other's pipes open, so without this they would wait for minutes, holding the
    frame file open. A thread waits on a pidfd of collect (Linux >= 5.3), else polls it.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):
        fd = None

    def watch() -> None:
        if fd is not None:
            select.select([fd], [], [])
        else:
            while pid_alive(pid):
                time.sleep(0.5)
        os._exit(1)  # its parent is gone: no one reads its results, nothing of it is worth keeping

    threading.Thread(target=watch, name=f"die-with-{pid}", daemon=True).start()


def _worker_init(collect_pid: int) -> None:
    die_with(collect_pid)
    cv2.setNumThreads(1)  # one process per core already; OpenCV threads would only contend


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes that start clean (no copied torch or thread state from the parent).

    forkserver imports the main module once and forks each worker from that; spawn (where there
    is no forkserver) imports it in every worker.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        # What the collect modules import, not src.collect itself: `python -m src.collect` runs it
        # again in each worker as the main module, and runpy warns when it is already imported.
        context.set_forkserver_preload(["numpy", "cv2", "gymnasium", "ale_py"])
        # Start the server now, not at the first submit: it imports those while the caller works.
        from multiprocessing import forkserver

        forkserver.ensure_running()
    else:
        context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init, initargs=(os.getpid(),))


def frame_digests(images: np.ndarray, rows: np.ndarray) -> dict[bytes, int]:
    """sha256 of each frame in `rows` of `images` -> its row (the first row, for repeated frames).

    Hashed in HWC order, as `run_shard` hashes the frames it plays.
    """
    digests: dict[bytes, int] = {}
    for row in rows.tolist():
        digests.setdefault(hashlib.sha256(np.ascontiguousarray(images[row].transpose(1, 2, 0))).digest(), row)
    return digests


def frame_file(rows: int, scratch: str | os.PathLike | None) -> tuple[str, np.ndarray]:
    """A temporary file for `rows` frames, mapped shared: workers write frames, the parent reads them.

    Its name holds this process's id: a run that was killed before it could delete its file has
    the file deleted by the next run in the same folder.
    """
    for old in Path(scratch or tempfile.gettempdir()).glob(".collect-*.frames"):
        pid = old.name.split("-")[1]
        if pid.isdigit() and not pid_alive(int(pid)):
            old.unlink(missing_ok=True)
    fd, path = tempfile.mkstemp(prefix=f".collect-{os.getpid()}-", suffix=".frames", dir=scratch)
    size = rows * math.prod(FRAME_SHAPE)
    try:
        # Reserve the disk space now: a full disk then fails here, not as a SIGBUS in a worker.
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
        else:
            os.ftruncate(fd, size)
    except OSError as exc:
        os.unlink(path)
        raise CollectError(
            f"cannot reserve {size / 1e6:.0f} MB for the frames in {Path(path).parent} ({exc.strerror}): "
            "free disk space there or lower collect.train_frames / collect.holdout_frames"
        ) from None
    finally:
        os.close(fd)
    return path, np.memmap(path, np.uint8, "r+", shape=(rows, *FRAME_SHAPE))


def env_info(game: str) -> dict[str, Any]:
    spec = gym.spec(game)
    return {"id": spec.id, "entry_point": str(spec.entry_point), "kwargs": dict(spec.kwargs)}


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "opencv": cv2.__version__, "numpy": np.__version__}
    for package in ("gymnasium", "ale-py"):
        versions[package] = metadata.version(package)
    return versions
