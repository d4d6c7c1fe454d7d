"""Benchmark: InceptionV3 feature extraction speed, and evaluate with a cold vs a warm FID cache.

(a) images/s of `src.fid.InceptionFeatures` (torchmetrics' NoTrainInceptionV3, 2048-d features,
TF1 bilinear resize of 64x64 screens to 299x299, fp32) on the chosen device, after one warm-up
batch; the device is synchronised before the clock stops.
(b) `src.evaluate.run_evaluation` (everything the stage does except the MLflow logging, so this runs
where mlflow is not installed) twice on a synthetic snapshot and an untrained full-size generator:
first with an empty FID cache (generated + holdout + training-floor features), then again (only
the generated side). Imports and weights resolution happen before either clock starts.

Needs the InceptionV3 weights (`python -m src.inception_weights`). Prints a markdown table.

    python -m benchmarks.bench_fid [--device cpu|cuda] [--images 200] [--batch-size 50]
                                   [--num-samples 100] [--holdout 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from benchmarks.results_md import machine
from src import evaluate, fid
from src.data import write_snapshot
from src.params import parse_params


def screens(n: int, seed: int) -> np.ndarray:
    """Breakout-like 64x64 screens: a wall, brick rows with gaps, a paddle, a ball."""
    rng = np.random.default_rng(seed)
    frames = np.zeros((n, 3, 64, 64), np.uint8)
    frames[:, :, :3] = 142
    bricks = rng.random((n, 6, 8)) > 0.3
    colours = rng.integers(40, 220, (6, 3), dtype=np.uint8)
    for row in range(6):
        for col in range(8):
            rows, cols = slice(8 + 3 * row, 10 + 3 * row), slice(8 * col, 8 * col + 7)
            frames[bricks[:, row, col], :, rows, cols] = colours[row][:, None, None]
    for i, (px, bx, by) in enumerate(rng.integers(0, 56, (n, 3))):
        frames[i, :, 58:60, px : px + 8] = 200
        frames[i, :, by : by + 2, bx : bx + 2] = 220
    return frames


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_extraction(weights: Path, device: torch.device, count: int, batch_size: int) -> float:
    extractor = fid.InceptionFeatures(weights, device=device, batch_size=batch_size, progress=False)
    images = torch.from_numpy(screens(count, seed=1))
    extractor(images[: min(batch_size, count)])  # warm-up: build, move, first kernels
    sync(device)
    start = time.perf_counter()
    extractor(images)
    sync(device)
    return count / (time.perf_counter() - start)


def bench_evaluate(device: torch.device, num_samples: int, holdout: int, batch_size: int) -> tuple[float, float, dict]:
    from src.models import Generator, model_kwargs
    from src.training import generator_payload

    params = parse_params({"evaluate": {"num_samples": num_samples, "batch_size": batch_size,
                                        "kid_subset_size": 1000, "device": device.type}})
    with tempfile.TemporaryDirectory(prefix="bench-fid-") as tmp:
        root = Path(tmp)
        arrays = {"train_images": screens(max(num_samples, holdout), seed=2),
                  "holdout_images": screens(holdout, seed=3)}
        arrays |= {"train_labels": np.zeros(len(arrays["train_images"]), np.uint8),
                   "holdout_labels": np.zeros(holdout, np.uint8)}
        write_snapshot(root / "snapshot", arrays, {"games": ["synthetic"]})
        state = Generator(**model_kwargs(params)["generator"]).state_dict()
        (root / "models").mkdir()
        torch.save(generator_payload(state, params, step=0, kind="generator"), root / "models" / "generator.pt")

        def once() -> tuple[float, dict]:
            start = time.perf_counter()
            metrics = evaluate.run_evaluation(
                params, snapshot_dir=root / "snapshot", models_dir=root / "models",
                metrics_file=root / "metrics" / "eval.json", grid_file=root / "grid.png",
                train_fid_csv=root / "fid.csv", cache_dir=root / "cache", progress=False)
            sync(device)
            return time.perf_counter() - start, metrics

        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", evaluate.SmallSampleWarning)
            cold, metrics = once()
            warm, _ = once()
    return cold, warm, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=200, help="images for the throughput run")
    parser.add_argument("--repeats", type=int, default=1, help="throughput runs (median reported)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--num-samples", type=int, default=100, help="evaluate.num_samples for (b)")
    parser.add_argument("--holdout", type=int, default=200, help="holdout frames in the synthetic snapshot")
    parser.add_argument("--skip-evaluate", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    load = os.getloadavg()[0]  # other work on the machine skews CPU numbers; recorded with them
    weights = fid.resolve_inception_weights(None, download=False)

    rates = [bench_extraction(weights, device, args.images, args.batch_size) for _ in range(args.repeats)]
    rate = statistics.median(rates)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    print(f"\nMachine: {machine(device)} · torch {torch.__version__} · {stamp} · "
          f"torch threads {torch.get_num_threads()} · load average {load:.1f} at start\n")
    print("| what | device | images | batch | result |")
    print("|---|---|---:|---:|---:|")
    print(f"| Inception features (64x64 -> 299, 2048-d, fp32) | {device.type} | {args.images} | {args.batch_size} "
          f"| {rate:.1f} img/s ({1000 / rate:.1f} ms/img) |")
    if not args.skip_evaluate:
        cold, warm, metrics = bench_evaluate(device, args.num_samples, args.holdout, args.batch_size)
        first_images = metrics["num_generated"] + metrics["num_real"] + metrics["num_train_for_floor"]
        print(f"| evaluate, empty FID cache (miss) | {device.type} | {first_images} | {args.batch_size} "
              f"| {cold:.1f} s |")
        print(f"| evaluate again, same snapshot (hit) | {device.type} | {metrics['num_generated']} | {args.batch_size} "
              f"| {warm:.1f} s ({cold / warm:.2f}x faster) |")


if __name__ == "__main__":
    main()
