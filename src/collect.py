"""Stage `collect`: random agents play Atari, their screens frozen into the frame snapshot.

Work is cut into shards: a number of env steps from `env.reset(seed=shard_seed)` and
`action_space.seed(shard_seed)`. A shard's seed comes from `np.random.SeedSequence(seed)` with
spawn key (split, game index, shard index), so train and holdout never share an env stream, and a
shard's frames depend only on those four numbers (a shorter shard is a prefix of the longer one).

Worker processes play the shards (src/rollout.py: envs, the frame filter, the shared frame file);
a shard's task names the rows of the frame file its frames take if none is dropped. The parent
merges shards in shard order, keeps the first occurrence of each exact frame per (split, game)
(moving later frames up over dropped ones), and tops a stream up with further shards until its
share is reached. So the arrays are bit-identical whatever the number of workers.

The holdout is content-disjoint from training: holdout streams merge only once every training
stream is complete, and then also drop every frame byte-identical to a training frame (random
rollouts of one game share their first frames), topping up like for any other drop. This holds
with `dedup` off too: FID against a holdout that contains training frames flatters a generator
that memorises them.
"""

from __future__ import annotations

import math
import mmap
import os
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

# Spawned workers import this module: torch (pulled in by src.data) and pydantic (src.params)
# stay out of the module level, or every worker would pay for importing them.
from src.errors import run_cli, stage_parser
from src.lock import project_lock
from src.paths import COLLECT_METRICS_FILE, SNAPSHOT_DIR, SPLITS
from src.rollout import (
    SIZE,
    CollectError,
    ShardResult,
    ShardTask,
    env_info,
    frame_digests,
    frame_file,
    library_versions,
    release_worker_state,
    run_shard,
    worker_pool,
)

if TYPE_CHECKING:
    from src.params import Params

SHUFFLE_KEY = (len(SPLITS),)  # a spawn key no shard uses (shard keys have three parts)
TOPUP_MARGIN = 1.25  # top-up shards play this much more than the yield so far says is needed
# A reseed costs ~0.09 s (a ROM load), as much as ~400 steps: no tiny top-up shards.
TOPUP_MIN_STEPS = 500


def shard_seed(seed: int, split: str, game_index: int, shard_index: int) -> int:
    """The env and action-space seed of one shard; distinct keys give independent streams."""
    sequence = np.random.SeedSequence(seed, spawn_key=(SPLITS.index(split), game_index, shard_index))
    return int(sequence.generate_state(1, np.uint64)[0])


def game_shares(total: int, n_games: int) -> list[int]:
    """An equal share per game; the remainder goes one frame each to the first games."""
    base, extra = divmod(total, n_games)
    return [base + (i < extra) for i in range(n_games)]


@dataclass
class _Stream:
    """The frames of one (split, game): shards planned, then merged in shard order.

    A round's shards are planned to fill the stream's next positions; each frame of the stream
    has its row (`slots`) in the run's frame array, so a worker can write it where it belongs.
    Merging only moves a frame when an earlier one was dropped; a merged frame is final.
    """

    split: str
    game_index: int
    game: str
    dedup: bool
    images: np.ndarray  # the run's (N, 3, 64, 64) frame array: all splits
    slots: np.ndarray  # rows of `images` for this stream's frames, in merge order
    count: int = 0
    seen: dict[bytes, int] = field(default_factory=dict)  # frame sha256 -> row of its first occurrence
    env_steps: int = 0
    dark: int = 0
    duplicates: int = 0
    surplus: int = 0  # frames played after the share was full
    train_duplicates: int = 0  # holdout frames dropped as exact copies of a training frame
    forbidden: dict[bytes, int] | None = None  # holdout only: training frame sha256 -> its row
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
            task = result.task
            self.env_steps += task.steps
            self.dark += result.dark
            self.shards.append({"index": index, "seed": task.seed, "steps": task.steps})
            placed = len(task.slots)
            for i in range(result.kept):
                if self.count == self.target:
                    self.surplus += result.kept - i
                    break
                # Frame i is in the row planned for it, or came back with the result.
                row = task.slots[i] if i < placed else -1
                frame = self.images[row] if i < placed else result.frames[i - placed]
                if self.forbidden is not None:
                    twin = self.forbidden.get(result.hashes[i])
                    if twin is not None and np.array_equal(self.images[twin], frame):
                        self.train_duplicates += 1
                        continue
                if self.dedup:
                    digest = result.hashes[i]
                    first = self.seen.get(digest)
                    # Compare bytes on a digest match, so removal is exact even in theory.
                    if first is not None and np.array_equal(self.images[first], frame):
                        self.duplicates += 1
                        continue
                # Rows of earlier positions are final or free: moving a frame up overwrites nothing.
                dest = self.slots[self.count]
                if dest != row:
                    self.images[dest] = frame
                if self.dedup:
                    self.seen.setdefault(digest, dest)
                self.count += 1
        self.round_new = self.count - before


def resolve_workers(workers: int | None, params: Params) -> int:
    workers = params.collect.workers if workers is None else workers
    if workers < 0:
        raise CollectError(f"workers = {workers}: use 0 (one per CPU core) or a positive number")
    if workers:
        return workers
    # The cores this process may run on (a container or taskset can allow fewer than the machine has).
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _touch_pages(array: np.ndarray) -> None:
    int(array.reshape(-1)[:: mmap.PAGESIZE].max())  # numpy lets go of the GIL while it reads


def lay_out_streams(params: Params, images: np.ndarray) -> tuple[dict[str, np.ndarray], list[_Stream]]:
    """The snapshot arrays (views of `images`) and one stream per (split, game), each owning its rows.

    Rows are a seeded permutation of places, so any prefix of a split mixes all games.
    """
    cfg = params.collect
    games = list(cfg.games)
    arrays: dict[str, np.ndarray] = {}
    streams: list[_Stream] = []
    rng = np.random.default_rng(np.random.SeedSequence(params.seed, spawn_key=SHUFFLE_KEY))
    first_row = 0
    for split, total in (("train", cfg.train_frames), ("holdout", cfg.holdout_frames)):
        arrays[f"{split}_images"] = np.asarray(images[first_row : first_row + total])
        labels = arrays[f"{split}_labels"] = np.empty(total, np.uint8)
        places = rng.permutation(total)
        start = 0
        for g, share in enumerate(game_shares(total, len(games))):
            slots = places[start : start + share]
            labels[slots] = g
            streams.append(_Stream(split=split, game_index=g, game=games[g], dedup=cfg.dedup,
                                   images=images, slots=first_row + slots))
            start += share
        first_row += total
    return arrays, streams


def next_tasks(stream: _Stream, params: Params, sink: str) -> list[ShardTask]:
    """The shard tasks of `stream`'s next round ([] once its share is reached)."""
    cfg = params.collect
    tasks, position = [], stream.count
    for index, steps in stream.plan(cfg.shard_frames):
        seed = shard_seed(params.seed, stream.split, stream.game_index, index)
        # Holdout frames are always hashed: they are checked against the training frames.
        tasks.append(ShardTask(stream.split, stream.game_index, index, stream.game, seed, steps,
                               cfg.interpolation, cfg.min_mean, cfg.dedup or stream.split == "holdout",
                               sink=sink, slots=stream.slots[position : position + steps]))
        position += steps
    return tasks


def play(
    params: Params, workers: int | None = None, progress: bool = True, scratch: str | os.PathLike | None = None
) -> tuple[dict[str, np.ndarray], list[_Stream]]:
    """Run every shard the streams need, in worker processes; fill the snapshot arrays in shard order.

    The frames are collected in a temporary file in `scratch` (default: the system's temp folder),
    deleted before this returns; the returned image arrays map it, so they stay valid.
    """
    cfg = params.collect
    if len(cfg.games) > 256:
        raise CollectError(f"collect.games lists {len(cfg.games)} games; labels are uint8, so at most 256 are allowed")
    workers = resolve_workers(workers, params)
    # First, so that the pool's server process starts (~0.3 s) while this one prepares the run.
    executor = worker_pool(workers) if workers > 1 else None  # workers=1 runs here, with no start-up
    sink, images = frame_file(cfg.train_frames + cfg.holdout_frames, scratch)  # (no worker runs yet)
    # Bring the file's pages into memory from a thread, in order, while the pool starts: frames
    # written to shuffled rows would fault in their pages one by one, at ~4x the cost. The thread
    # only reads, so it never races with a worker's writes.
    toucher = threading.Thread(target=_touch_pages, args=(images,), daemon=True)
    toucher.start()
    try:
        arrays, streams = lay_out_streams(params, images)
        by_key = {(s.split, s.game_index): s for s in streams}
        train_streams = [s for s in streams if s.split == "train"]
        # Holdout streams whose shards are in but that wait for the training frames to be final.
        parked: list[_Stream] = []

        def train_final() -> bool:
            """Whether every training stream is complete; then hand the holdout streams its frames."""
            if not all(s.count == s.target for s in train_streams):
                return False
            if streams[-1].forbidden is None:
                forbidden = frame_digests(images, np.concatenate([s.slots for s in train_streams]))
                for s in streams:
                    if s.split == "holdout":
                        s.forbidden = forbidden
            return True

        def advance(stream: _Stream) -> None:
            stream.merge()
            tasks = next_tasks(stream, params, sink)
            queue.extendleft(reversed(tasks))  # top-ups first: they gate their stream
            bar.total += sum(t.steps for t in tasks)

        # Longest shards first, so the last ones to finish are short; among equal ones, one shard of
        # each stream in turn, so a worker often gets a stream it already has the env of.
        train_final()  # no training frames at all: nothing to wait for
        queue = deque(sorted((t for s in streams for t in next_tasks(s, params, sink)), key=lambda t: (-t.steps, t.index)))
        from tqdm import tqdm

        running: set = set()
        with tqdm(total=sum(t.steps for t in queue), unit="frame", unit_scale=True, desc="collect",
                  disable=not progress, smoothing=0.1) as bar:
            while queue or running:
                if executor is None:
                    finished = [run_shard(queue.popleft())]
                else:
                    # Hand out work lazily (one spare task beyond the busy workers), so that a top-up
                    # put at the front of the queue runs next, not after everything already queued.
                    # (The pool starts a process per task while it has fewer than `workers`.)
                    while queue and len(running) <= workers:
                        running.add(executor.submit(run_shard, queue.popleft()))
                    done, running = wait(running, return_when=FIRST_COMPLETED)
                    finished = [future.result() for future in done]
                for result in finished:
                    bar.update(result.task.steps)
                    stream = by_key[(result.task.split, result.task.game_index)]
                    stream.waiting[result.task.index] = result
                    # A stream plans its next round once all its shards are in, whatever the other
                    # streams do: the plan then depends only on that stream's own frames.
                    if not all(r is not None for r in stream.waiting.values()):
                        continue
                    if stream.split == "holdout" and stream.forbidden is None:
                        parked.append(stream)  # merged once the training frames are final
                        continue
                    advance(stream)
                    if stream.split == "train" and train_final():
                        for waiting in sorted(parked, key=lambda s: s.game_index):
                            advance(waiting)
                        parked.clear()
                    bar.refresh()
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        toucher.join()
        release_worker_state()  # shards that ran in this process (workers=1) leave their state here
        os.unlink(sink)  # the mapping in `images` outlives the name
    return arrays, streams


def collect_frames(
    params: Params, workers: int | None = None, progress: bool = True, scratch: str | os.PathLike | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Play the games of `params.collect`; return the snapshot arrays and the manifest fields.

    The manifest holds only what the seed and params decide (no time, date or worker count), so the same seed
    and params give the same snapshot folder byte for byte, and DVC the same hash: how this run went is
    `collect_metrics`'s."""
    cfg = params.collect
    games = list(cfg.games)
    arrays, streams = play(params, workers=resolve_workers(workers, params), progress=progress, scratch=scratch)
    per_game: dict[str, dict[str, Any]] = {split: {} for split in SPLITS}
    for stream in streams:
        per_game[stream.split][stream.game] = {
            "frames": stream.count,
            "env_steps": stream.env_steps,
            "dark_dropped": stream.dark,
            "duplicates_dropped": stream.duplicates,
            "surplus_dropped": stream.surplus,
            **({"train_duplicates_dropped": stream.train_duplicates} if stream.split == "holdout" else {}),
            "shards": stream.shards,
        }
    manifest = {
        "games": games,
        "labels": {str(g): game for g, game in enumerate(games)},
        "env_ids": {game: env_info(game) for game in games},
        "seed": params.seed,
        "counts": {split: {game: per_game[split][game]["frames"] for game in games} for split in SPLITS},
        "seeds": {split: sorted(s["seed"] for game in games for s in per_game[split][game]["shards"]) for split in SPLITS},
        "per_game": per_game,
        "image_shape": [3, SIZE, SIZE],
        "layout": "NCHW uint8 RGB; each split's frames of all games shuffled with a seeded permutation",
        "interpolation": cfg.interpolation,
        "filters": {"min_mean": cfg.min_mean, "min_mean_on": "64x64 resized frame, 0..255", "dedup": cfg.dedup,
                    "holdout_disjoint_from_train": True},
        "holdout_train_duplicates_dropped": sum(s.train_duplicates for s in streams),
        "agent": "random: env.action_space.sample(); env.reset(seed) and action_space.seed(seed) once per shard",
        "shard_frames": cfg.shard_frames,
        "env_steps": sum(s.env_steps for s in streams),
        "versions": library_versions(),
    }
    return arrays, manifest


def collect_snapshot(
    params: Params, out_dir: str | os.PathLike, workers: int | None = None, progress: bool = True
) -> Path:
    """Collect the frames `params` asks for and write them as a snapshot at `out_dir`, atomically."""
    from src.data import write_snapshot

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Frames are gathered in a temporary file beside the snapshot: same disk, not a small /tmp.
    arrays, manifest = collect_frames(params, workers=workers, progress=progress, scratch=out_dir.parent)
    return write_snapshot(out_dir, arrays, manifest)


def collect_metrics(manifest: dict[str, Any], workers: int, seconds: float) -> dict[str, Any]:
    """How one collect run went (metrics/collect.json): what it kept and dropped, its workers and its time."""
    per_game = [s for split in SPLITS for s in manifest["per_game"][split].values()]
    return {
        "frames": {split: sum(manifest["counts"][split].values()) for split in SPLITS},
        "env_steps": manifest["env_steps"],
        "dropped": {"dark": sum(s["dark_dropped"] for s in per_game),
                    "duplicates": sum(s["duplicates_dropped"] for s in per_game),
                    "holdout_copies_of_training_frames": manifest.get("holdout_train_duplicates_dropped", 0)},
        "workers": workers,
        "collect_seconds": round(seconds, 2),
        "env_steps_per_s": round(manifest["env_steps"] / max(seconds, 1e-9), 1),
    }


def collect_and_time(params: Params, out_dir: str | os.PathLike, workers: int | None = None,
                     progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """`collect_snapshot`, timed end to end (worker start-up and the snapshot write included): the snapshot's
    path and its `collect_metrics`."""
    from src.data import load_snapshot

    workers = resolve_workers(workers, params)
    started = time.perf_counter()
    path = collect_snapshot(params, out_dir, workers=workers, progress=progress)
    seconds = time.perf_counter() - started
    return path, collect_metrics(load_snapshot(path, verify=False).manifest, workers, seconds)


def summary(metrics: dict[str, Any], games: int, path: Path) -> str:
    """The one line `python -m src.collect` prints at the end, from its `collect_metrics`."""
    frames, dropped = metrics["frames"], metrics["dropped"]
    return (
        f"collect: {frames['train']} train + {frames['holdout']} holdout frames of {games} games -> {path} | "
        f"{metrics['env_steps']} env steps in {metrics['collect_seconds']:.1f} s ({metrics['env_steps_per_s']:.0f} "
        f"frames/s, {metrics['workers']} workers) | dropped {dropped['dark']} dark, {dropped['duplicates']} "
        f"duplicate frames, {dropped['holdout_copies_of_training_frames']} holdout copies of training frames"
    )


def main(argv: list[str] | None = None) -> None:
    from src.atomic import write_json_atomic
    from src.params import load_params

    stage_parser("python -m src.collect", __doc__).parse_args(argv)
    params = load_params()
    with project_lock():
        path, metrics = collect_and_time(params, SNAPSHOT_DIR)
        write_json_atomic(COLLECT_METRICS_FILE, metrics)
    print(summary(metrics, len(params.collect.games), path))


if __name__ == "__main__":
    run_cli(main)
