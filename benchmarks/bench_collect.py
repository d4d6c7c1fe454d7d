"""Benchmark: frames/s of the article's collection loop against `src.collect`, side by side.

(a) The article's loop: one process, Breakout/AirRaid/Pong-v4 behind its `InputWrapper` (resize to
64x64, HWC->CHW, float32), `random.choice(envs)` each step, the `np.mean(obs) > 0.01` filter,
reset on done. Timed over the loop only (env creation excluded, which favours the article), and
without the step that turns each batch of 16 into a normalised float tensor: the reference row.
(a') The same loop as published, with that step (`torch.tensor(batch * 2 / 255 - 1)`): what the
article's loop yields. Reported for scale; "vs article" stays relative to (a).
(b) `src.collect.collect_frames` with the params.yaml settings at the same frame count but
`dedup: false`, on every core: the same work as the article (it keeps duplicates too, and plays
exactly as many env steps). Timed end to end: its own worker start-up, a reseed (ROM load) per
shard, and the final shuffled uint8 arrays (the snapshot write is not timed; the article writes
nothing either). This row is the one the speed floor is about.
(c) The same with `dedup: true`: it plays more env steps, to replace the duplicates it drops.

Runs alternate (a), (a'), (b), (c), (a), ... so all see the same machine load. Wall-clock frames/s is
what counts, but other jobs on the machine slow a two-process loop more than a one-process one,
so CPU time per frame is printed too. Also prints the machine, and what the dark-frame filter
and dedup dropped per game in the last (c) run.

    python -m benchmarks.bench_collect [--frames 36000] [--repeats 3] [--workers 0] [--shard-frames N]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import resource
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from multiprocessing import forkserver
from typing import TYPE_CHECKING, Any

import ale_py
import gymnasium as gym
import numpy as np

from benchmarks.article import article_envs
from src.collect import collect_frames, resolve_workers
from src.paths import SPLITS

if TYPE_CHECKING:
    from src.params import Params


@dataclass
class Timing:
    wall_s: float
    cpu_s: float  # CPU of this process and of its finished children: load-independent cost


def _cpu_now() -> float:
    """CPU seconds of this process, its reaped children, and the forkserver with its reaped workers."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    # Forkserver workers are the forkserver's children, not ours: read its account from /proc.
    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    if pid:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        total += sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime
    return total


def article_loop(frames: int, seed: int, batch_size: int = 16, to_tensor: bool = False) -> Timing:
    """The article's `iterate_batches` loop until it has yielded `frames` frames (in batches).

    `to_tensor`: also build each batch's tensor, as the published loop does before yielding it.
    """
    if to_tensor:
        import torch  # here: workers import this module as their main module
    ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)
    random.seed(seed)
    envs = article_envs()
    for i, env in enumerate(envs):  # seeded only so that runs repeat; costs nothing per step
        env.reset(seed=seed + i)
        env.action_space.seed(seed + i)
    batch: list[np.ndarray] = []
    produced = 0
    started, cpu = time.perf_counter(), _cpu_now()
    while produced < frames:
        e = random.choice(envs)
        obs, reward, is_done, is_trunc, _ = e.step(e.action_space.sample())
        if np.mean(obs) > 0.01:
            batch.append(obs)
            produced += 1
            if len(batch) == batch_size:
                if to_tensor:
                    batch_np = np.array(batch, dtype=np.float32)
                    torch.tensor(batch_np * 2.0 / 255.0 - 1.0)
                batch.clear()
        if is_done or is_trunc:
            e.reset()
    timing = Timing(time.perf_counter() - started, _cpu_now() - cpu)
    for env in envs:
        env.close()
    return timing


def bench_params(frames: int, seed: int, **collect: Any) -> Params:
    """params.yaml with `frames` frames in all (split train:holdout as there), `seed` and overrides."""
    # Imported here, as src.collect does: workers import this module as their main module, and
    # should pay for what `python -m src.collect`'s workers pay for, no more.
    from src.params import load_params

    params = load_params()
    cfg = params.collect
    holdout = round(frames * cfg.holdout_frames / (cfg.train_frames + cfg.holdout_frames))
    update = {"train_frames": frames - holdout, "holdout_frames": holdout, **collect}
    return params.model_copy(update={"seed": seed, "collect": cfg.model_copy(update=update)})


def ours(params: Params, workers: int) -> tuple[Timing, dict]:
    """`collect_frames` end to end (worker start-up included) for the frames of `params`."""
    frames = params.collect.train_frames + params.collect.holdout_frames
    # Every run starts its own forkserver, as `python -m src.collect` does (private API; 3.8+).
    stop = getattr(forkserver._forkserver, "_stop", None)
    if stop:
        stop()
    started, cpu = time.perf_counter(), _cpu_now()
    arrays, manifest = collect_frames(params, workers=workers, progress=False)
    timing = Timing(time.perf_counter() - started, _cpu_now() - cpu)
    assert sum(len(arrays[f"{s}_images"]) for s in SPLITS) == frames
    manifest["min_frame_mean"] = {
        game: float(min(np.mean(arrays[f"{s}_images"][arrays[f"{s}_labels"] == g], axis=(1, 2, 3)).min() for s in SPLITS))
        for g, game in enumerate(manifest["games"])
    }
    return timing, manifest


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=36_000, help="frames per run (default: params.yaml's 30k + 6k)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0, help="0 = one per CPU core")
    parser.add_argument("--shard-frames", type=int, default=None, help="default: params.yaml's")
    args = parser.parse_args()

    overrides = {"shard_frames": args.shard_frames} if args.shard_frames else {}
    cfg = bench_params(args.frames, 0, **overrides).collect
    mark = {cfg.dedup: " (params.yaml)", not cfg.dedup: ""}
    variants = {  # name -> collect overrides; the article's work (duplicates kept) first
        f"src.collect, dedup=False{mark[False]}": {**overrides, "dedup": False},
        f"src.collect, dedup=True{mark[True]}": {**overrides, "dedup": True},
    }
    print(f"# {args.frames} frames, {args.repeats} repeats; ours: shard_frames={cfg.shard_frames}, "
          f"interpolation={cfg.interpolation}, workers={args.workers or 'one per core'}")
    published = "article as published, with its batch -> tensor step"
    runs: dict[str, list[Timing]] = {"article": [], published: [], **{name: [] for name in variants}}
    manifests: dict[str, dict] = {}
    loads = [os.getloadavg()[0]]
    for r in range(args.repeats):
        # Interleaved, so that every loop sees the same machine load.
        runs["article"].append(article_loop(args.frames, seed=r))
        runs[published].append(article_loop(args.frames, seed=r, to_tensor=True))
        for name, collect in variants.items():
            timing, manifests[name] = ours(bench_params(args.frames, r, **collect), args.workers)
            runs[name].append(timing)
        loads.append(os.getloadavg()[0])
        print(f"  repeat {r + 1}: " + ", ".join(f"{n.split(' (')[0]} {args.frames / t[-1].wall_s:,.0f} frames/s"
                                                for n, t in runs.items()) + f"; load {loads[-1]:.2f}", flush=True)

    workers = resolve_workers(args.workers, bench_params(args.frames, 0))
    print()
    print(f"{datetime.now(timezone.utc):%Y-%m-%d} · {cpu_model()}, {os.cpu_count()} cores · Python "
          f"{platform.python_version()}, gymnasium {gym.__version__}, ale-py {ale_py.__version__} · "
          f"1-min load average during the runs {min(loads):.2f}-{max(loads):.2f}")
    print()
    print("| loop | processes | frames | env steps | median wall s | frames/s | vs article | CPU ms per 1k frames |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    article_fps = args.frames / statistics.median(t.wall_s for t in runs["article"])
    for name, timings in runs.items():
        wall = statistics.median(t.wall_s for t in timings)
        cpu = statistics.median(t.cpu_s for t in timings)
        steps = manifests[name]["env_steps"] if name in manifests else args.frames
        label = "article: random env each step, float32 wrapper, np.mean filter" if name == "article" else name
        print(f"| {label} | {workers if name in manifests else 1} | {args.frames} | {steps} | {wall:.2f} | "
              f"{args.frames / wall:,.0f} | {args.frames / wall / article_fps:.2f}x | {1000 * cpu / args.frames * 1000:,.0f} |")

    dedup_run = list(variants)[1]
    manifest = manifests[dedup_run]
    print()
    print(f"What the filters dropped ({dedup_run}, last repeat):")
    print()
    print("| game | split | env steps | dark-frame filter dropped | duplicates dropped | darkest kept frame (mean, 0..255) |")
    print("|---|---|---:|---:|---:|---:|")
    for split in SPLITS:
        for game, s in manifest["per_game"][split].items():
            examined = s["env_steps"] - s["dark_dropped"] - s["surplus_dropped"]
            print(f"| {game} | {split} | {s['env_steps']} | {s['dark_dropped']} ({100 * s['dark_dropped'] / s['env_steps']:.1f}%) | "
                  f"{s['duplicates_dropped']} ({100 * s['duplicates_dropped'] / max(examined, 1):.1f}%) | "
                  f"{manifest['min_frame_mean'][game]:.1f} |")


if __name__ == "__main__":
    main()
