"""Stage `collect`: random agents play Atari, their screens frozen into the frame snapshot.

Work is cut into shards: one fresh env instance, one seed and a fixed number of env steps each.
A shard's seed comes from `np.random.SeedSequence(seed)` with spawn key (split, game index, shard
index), so train and holdout never share an env stream, and a shard's frames depend only on those
four numbers (a shorter shard is a prefix of the longer one). Shards run in worker processes and
are merged in shard order, so the arrays are bit-identical whatever the number of workers.

Each frame is resized to 64x64 in the worker, passed through the article's dark-frame test (on
the small frame) and hashed; the parent keeps the first occurrence of each exact frame per
(split, game), and tops a stream up with further shards until its share is reached.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
import platform
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import ale_py
import cv2
import gymnasium as gym
import numpy as np

# Spawned workers import this module: torch (pulled in by src.data) stays out of the module
# level, or every worker would pay seconds to import it.
from src.errors import UserError, run_cli
from src.params import Params, load_params

SPLITS = ("train", "holdout")
SIZE = 64
INTERPOLATIONS = {
    "linear": cv2.INTER_LINEAR,  # cv2.resize's default, what the article's wrapper uses
    "area": cv2.INTER_AREA,
    "nearest": cv2.INTER_NEAREST,
    "cubic": cv2.INTER_CUBIC,
}
SHUFFLE_KEY = (len(SPLITS),)  # a spawn key no shard uses (shard keys have three parts)
TOPUP_MARGIN = 1.25  # top-up shards play this much more than the yield so far says is needed
# A fresh env costs ~0.2 s (two ROM loads), as much as ~700 steps: no tiny top-up shards.
TOPUP_MIN_STEPS = 500


class CollectError(UserError):
    pass


@dataclass(frozen=True)
class ShardTask:
    """One unit of work: `steps` env steps of `game` in one fresh env seeded with `seed`."""

    split: str
    game_index: int
    index: int
    game: str
    seed: int
    steps: int
    interpolation: str
    min_mean: float
    hash_frames: bool


@dataclass
class ShardResult:
    task: ShardTask
    frames: np.ndarray  # (n, 3, 64, 64) uint8: the frames that passed the dark-frame filter
    hashes: list[bytes]  # sha256 of each frame (empty when dedup is off)
    dark: int  # frames the dark-frame filter dropped


def shard_seed(seed: int, split: str, game_index: int, shard_index: int) -> int:
    """The env and action-space seed of one shard; distinct keys give independent streams."""
    sequence = np.random.SeedSequence(seed, spawn_key=(SPLITS.index(split), game_index, shard_index))
    return int(sequence.generate_state(1, np.uint64)[0])


def game_shares(total: int, n_games: int) -> list[int]:
    """An equal share per game; the remainder goes one frame each to the first games."""
    base, extra = divmod(total, n_games)
    return [base + (i < extra) for i in range(n_games)]


_buffers: dict[str, np.ndarray] = {}


def _buffer(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A per-process array reused across shards: fresh memory is slow to touch on a VM (~2 ms/MB)."""
    buffer = _buffers.get(name)
    if buffer is None or len(buffer) < shape[0]:
        buffer = _buffers[name] = np.empty(shape, np.uint8)
    return buffer[: shape[0]]


def run_shard(task: ShardTask) -> ShardResult:
    """Play one shard with a random agent; resize, filter and (optionally) hash every frame.

    The frames depend only on the task: the same task gives the same frames in any process.
    """
    result = _play_shard(task)
    result.frames = result.frames.copy()
    return result


def _play_shard(task: ShardTask) -> ShardResult:
    """`run_shard` for pool workers: the frames are a view of this process's buffer, valid until
    its next shard (a worker pickles its result before it takes the next task)."""
    gym.register_envs(ale_py)
    ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)  # no banner from every worker
    interpolation = INTERPOLATIONS[task.interpolation]
    threshold = task.min_mean * 3  # cv2.mean gives one mean per channel: compare their sum
    hwc = _buffer("hwc", (task.steps, SIZE, SIZE, 3))
    kept = 0
    env = gym.make(task.game)
    try:
        # Both seeds are needed for a reproducible rollout (DESIGN.md).
        env.reset(seed=task.seed)
        env.action_space.seed(task.seed)
        for _ in range(task.steps):
            obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
            small = cv2.resize(obs, (SIZE, SIZE), dst=hwc[kept], interpolation=interpolation)
            # The article's np.mean(obs) > 0.01, taken on the 64x64 frame: cv2.mean there costs
            # ~1 us where np.mean on the raw frame costs ~40 us.
            m = cv2.mean(small)
            if m[0] + m[1] + m[2] > threshold:
                kept += 1
            if terminated or truncated:
                env.reset()
    finally:
        env.close()
    # To CHW here, in parallel, into a reused buffer: the parent then copies whole frames.
    frames = _buffer("chw", (kept, 3, SIZE, SIZE))
    np.copyto(frames, hwc[:kept].transpose(0, 3, 1, 2))
    hashes = [hashlib.sha256(frame).digest() for frame in frames] if task.hash_frames else []
    return ShardResult(task=task, frames=frames, hashes=hashes, dark=task.steps - kept)


@dataclass
class _Stream:
    """The frames of one (split, game): shards planned, then merged in shard order into `slots`.

    A merged frame is final (later shards only append), so it goes straight to its place in the
    split's array while other shards still play, and its shard's buffer can be freed.
    """

    split: str
    game_index: int
    game: str
    dedup: bool
    images: np.ndarray  # the whole split's (N, 3, 64, 64) array
    slots: np.ndarray  # where this stream's frames go in `images`, in merge order
    count: int = 0
    seen: dict[bytes, int] = field(default_factory=dict)  # frame sha256 -> slot of its first occurrence
    env_steps: int = 0
    dark: int = 0
    duplicates: int = 0
    surplus: int = 0  # frames played after the share was full
    shards: list[dict[str, int]] = field(default_factory=list)
    next_index: int = 0
    waiting: dict[int, ShardResult | None] = field(default_factory=dict)  # this round's shards
    round_new: int = 0

    @property
    def target(self) -> int:
        return len(self.slots)

    def plan(self, shard_frames: int) -> list[tuple[int, int]]:
        """(shard index, steps) of the next round, or [] when the share is reached.

        The first round plays exactly the share. A top-up round plays what the yield so far says
        is missing, with a margin; after a round that gave nothing new, a full shard, and if even
        that gives nothing, the settings cannot fill the share.
        """
        missing = self.target - self.count
        if missing <= 0:
            return []
        if not self.shards:
            steps = missing
        else:
            round_steps = sum(s["steps"] for s in self.shards[-len(self.waiting) :])
            if self.round_new == 0 and round_steps >= shard_frames:
                raise CollectError(
                    f"{self.game} ({self.split}): {round_steps} env steps gave no new frame "
                    f"({self.dark} dropped as dark, {self.duplicates} as duplicates so far); "
                    "lower collect.min_mean (the article's is 0.01) or set collect.dedup: false"
                )
            if self.round_new == 0:
                steps = shard_frames
            else:
                steps = math.ceil(TOPUP_MARGIN * missing * self.env_steps / self.count)
            steps = max(steps, min(TOPUP_MIN_STEPS, shard_frames))
        sizes = [shard_frames] * (steps // shard_frames) + ([steps % shard_frames] if steps % shard_frames else [])
        plan = [(self.next_index + i, size) for i, size in enumerate(sizes)]
        self.next_index += len(plan)
        self.waiting = dict.fromkeys(index for index, _ in plan)
        return plan

    def merge(self) -> None:
        """Place this round's frames in shard order, dropping exact duplicates of earlier frames."""
        before = self.count
        for index in sorted(self.waiting):
            result = self.waiting[index]
            assert result is not None
            self.waiting[index] = None  # free the shard's frames once placed
            self.env_steps += result.task.steps
            self.dark += result.dark
            self.shards.append({"index": index, "seed": result.task.seed, "steps": result.task.steps})
            frames, room = result.frames, self.target - self.count
            if not self.dedup:
                take = frames[:room]
                self.images[self.slots[self.count : self.count + len(take)]] = take
                self.count += len(take)
                self.surplus += len(frames) - len(take)
                continue
            for i, digest in enumerate(result.hashes):
                if self.count == self.target:
                    self.surplus += len(frames) - i
                    break
                frame = frames[i]
                first = self.seen.get(digest)
                # Compare bytes on a digest match, so removal is exact even in theory.
                if first is not None and np.array_equal(self.images[first], frame):
                    self.duplicates += 1
                    continue
                slot = self.slots[self.count]
                self.images[slot] = frame
                self.seen.setdefault(digest, slot)
                self.count += 1
        self.round_new = self.count - before


def _resolve_workers(workers: int | None, params: Params) -> int:
    workers = params.collect.workers if workers is None else workers
    if workers < 0:
        raise CollectError(f"workers = {workers}: use 0 (one per CPU core) or a positive number")
    if workers:
        return workers
    # The cores this process may run on (a container or taskset can allow fewer than the machine has).
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _worker_init() -> None:
    cv2.setNumThreads(1)  # one process per core already; OpenCV threads would only contend


def _pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes that start clean (no copied torch or thread state from the parent).

    forkserver imports this module once and forks each worker from that; spawn (where there is
    no forkserver) imports it in every worker.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        # What this module imports, not the module itself: `python -m src.collect` runs it again
        # in each worker as the main module, and runpy warns when it is already imported.
        context.set_forkserver_preload(["numpy", "cv2", "gymnasium", "ale_py", "src.params"])
    else:
        context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init)


def play(params: Params, workers: int | None = None, progress: bool = True) -> tuple[dict[str, np.ndarray], list[_Stream]]:
    """Run every shard the streams need, in worker processes; fill the snapshot arrays in shard order."""
    cfg = params.collect
    games = list(cfg.games)
    if len(games) > 256:
        raise CollectError(f"collect.games lists {len(games)} games; labels are uint8, so at most 256 are allowed")
    arrays: dict[str, np.ndarray] = {}
    streams: list[_Stream] = []
    rng = np.random.default_rng(np.random.SeedSequence(params.seed, spawn_key=SHUFFLE_KEY))
    for split, total in (("train", cfg.train_frames), ("holdout", cfg.holdout_frames)):
        images = arrays[f"{split}_images"] = np.empty((total, 3, SIZE, SIZE), np.uint8)
        labels = arrays[f"{split}_labels"] = np.empty(total, np.uint8)
        # A seeded permutation of places, so any prefix of a split mixes all games.
        places = rng.permutation(total)
        start = 0
        for g, share in enumerate(game_shares(total, len(games))):
            slots = places[start : start + share]
            labels[slots] = g
            streams.append(_Stream(split=split, game_index=g, game=games[g], dedup=cfg.dedup, images=images, slots=slots))
            start += share

    def next_round(stream: _Stream) -> list[ShardTask]:
        return [
            ShardTask(stream.split, stream.game_index, index, stream.game,
                      shard_seed(params.seed, stream.split, stream.game_index, index),
                      steps, cfg.interpolation, cfg.min_mean, cfg.dedup)
            for index, steps in stream.plan(cfg.shard_frames)
        ]

    by_key = {(s.split, s.game_index): s for s in streams}
    queue = deque(sorted((t for s in streams for t in next_round(s)), key=lambda t: -t.steps))
    workers = min(_resolve_workers(workers, params), len(queue))
    from tqdm import tqdm

    bar = tqdm(total=sum(t.steps for t in queue), unit="frame", unit_scale=True, desc="collect",
               disable=not progress, smoothing=0.1)
    executor = _pool(workers) if workers > 1 else None  # workers=1 runs here, with no start-up
    running: set = set()
    try:
        while queue or running:
            if executor is None:
                finished = [run_shard(queue.popleft())]
            else:
                # Hand out work lazily (one spare task beyond the busy workers), so that a top-up
                # put at the front of the queue runs next, not after everything already queued.
                while queue and len(running) <= workers:
                    running.add(executor.submit(_play_shard, queue.popleft()))
                done, running = wait(running, return_when=FIRST_COMPLETED)
                finished = [future.result() for future in done]
            for result in finished:
                bar.update(result.task.steps)
                stream = by_key[(result.task.split, result.task.game_index)]
                stream.waiting[result.task.index] = result
                # A stream plans its next round once all its shards are in, whatever the other
                # streams do: the plan then depends only on that stream's own frames.
                if all(r is not None for r in stream.waiting.values()):
                    stream.merge()
                    tasks = next_round(stream)
                    queue.extendleft(reversed(tasks))  # top-ups first: they gate their stream
                    bar.total += sum(t.steps for t in tasks)
                    bar.refresh()
    finally:
        bar.close()
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        _buffers.clear()  # shards that ran in this process (workers=1) leave their buffers here
    return arrays, streams


def collect_frames(
    params: Params, workers: int | None = None, progress: bool = True
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Play the games of `params.collect`; return the snapshot arrays and the manifest fields."""
    cfg = params.collect
    games = list(cfg.games)
    workers = _resolve_workers(workers, params)
    started = time.perf_counter()
    arrays, streams = play(params, workers=workers, progress=progress)
    elapsed = time.perf_counter() - started
    per_game: dict[str, dict[str, Any]] = {split: {} for split in SPLITS}
    for stream in streams:
        per_game[stream.split][stream.game] = {
            "frames": stream.count,
            "env_steps": stream.env_steps,
            "dark_dropped": stream.dark,
            "duplicates_dropped": stream.duplicates,
            "surplus_dropped": stream.surplus,
            "shards": stream.shards,
        }
    manifest = {
        "games": games,
        "labels": {str(g): game for g, game in enumerate(games)},
        "env_ids": {game: _env_info(game) for game in games},
        "seed": params.seed,
        "counts": {split: {game: per_game[split][game]["frames"] for game in games} for split in SPLITS},
        "seeds": {split: sorted(s["seed"] for game in games for s in per_game[split][game]["shards"]) for split in SPLITS},
        "per_game": per_game,
        "image_shape": [3, SIZE, SIZE],
        "layout": "NCHW uint8 RGB; each split's frames of all games shuffled with a seeded permutation",
        "interpolation": cfg.interpolation,
        "filters": {"min_mean": cfg.min_mean, "min_mean_on": "64x64 resized frame, 0..255", "dedup": cfg.dedup},
        "agent": "random: env.action_space.sample(); env.reset(seed) and action_space.seed(seed) once per shard",
        "shard_frames": cfg.shard_frames,
        "env_steps": sum(s.env_steps for s in streams),
        "workers": workers,
        "collect_seconds": round(elapsed, 2),
        "versions": _versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return arrays, manifest


def _env_info(game: str) -> dict[str, Any]:
    spec = gym.spec(game)
    return {"id": spec.id, "entry_point": str(spec.entry_point), "kwargs": dict(spec.kwargs)}


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "opencv": cv2.__version__, "numpy": np.__version__}
    for package in ("gymnasium", "ale-py"):
        versions[package] = metadata.version(package)
    return versions


def collect_snapshot(
    params: Params, out_dir: str | os.PathLike, workers: int | None = None, progress: bool = True
) -> Path:
    """Collect the frames `params` asks for and write them as a snapshot at `out_dir`, atomically."""
    from src.data import write_snapshot

    arrays, manifest = collect_frames(params, workers=workers, progress=progress)
    return write_snapshot(Path(out_dir), arrays, manifest)


def summary(manifest: dict[str, Any], path: Path) -> str:
    """The one line `python -m src.collect` prints at the end."""
    per_game = [s for split in SPLITS for s in manifest["per_game"][split].values()]
    counts = {split: sum(manifest["counts"][split].values()) for split in SPLITS}
    steps, seconds = manifest["env_steps"], manifest["collect_seconds"]
    return (
        f"collect: {counts['train']} train + {counts['holdout']} holdout frames of {len(manifest['games'])} games "
        f"-> {path} | {steps} env steps in {seconds:.1f} s ({steps / max(seconds, 1e-9):.0f} frames/s, "
        f"{manifest['workers']} workers) | dropped {sum(s['dark_dropped'] for s in per_game)} dark, "
        f"{sum(s['duplicates_dropped'] for s in per_game)} duplicate frames"
    )


def main() -> None:
    from src.data import DEFAULT_DIR, load_snapshot

    params = load_params()
    path = collect_snapshot(params, DEFAULT_DIR)
    print(summary(load_snapshot(path, verify=False).manifest, path))


if __name__ == "__main__":
    run_cli(main)
