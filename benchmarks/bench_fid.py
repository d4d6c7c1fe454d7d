"""Benchmark: InceptionV3 feature extraction speed, and evaluate with a cold vs a warm FID cache.

(a) images/s of `src.inception.InceptionFeatures` (torchmetrics' NoTrainInceptionV3, 2048-d features,
TF1 bilinear resize of 64x64 screens to 299x299, fp32) on the chosen device, after one warm-up
batch; the device is synchronised before the clock stops.
(b) `src.evaluate.run_evaluation` (everything the stage does except the MLflow logging, so this runs
where mlflow is not installed) twice on a synthetic snapshot and an untrained full-size generator:
first with an empty FID cache (generated + holdout + training-floor features), then again (only
the generated side). Imports and weights resolution happen before either clock starts.

(c) `--backends`: on the CPU, the reference path (torchmetrics' module in torch, what src.fid ran
before) against the default fast path (ONNX Runtime), on the same images in alternating chunks in
one process, so load from other jobs hits both alike: median img/s and CPU-seconds per image of
each, and FID of N synthetic screens vs N noisy ones from each path's features.

Needs the InceptionV3 weights (`python -m src.inception_weights`). Prints a markdown table.

    python -m benchmarks.bench_fid [--device cpu|cuda] [--images 200] [--batch-size 50]
                                   [--num-samples 100] [--holdout 200]
    python -m benchmarks.bench_fid --backends [--fid-images 500] [--chunk 100] [--threads N]
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
from src import evaluate, fid, inception, quality_metrics
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
    extractor = inception.InceptionFeatures(weights, device=device, batch_size=batch_size, progress=False)
    images = torch.from_numpy(screens(count, seed=1))
    extractor(images[: min(batch_size, count)])  # warm-up: build, move, first kernels
    sync(device)
    start = time.perf_counter()
    extractor(images)
    sync(device)
    return count / (time.perf_counter() - start)


def noisy(images: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sigma, images.shape)
    return np.clip(images + noise, 0, 255).astype(np.uint8)


def bench_backends(weights: Path, count: int, chunk: int, batch_size: int) -> dict:
    """Reference (torch) vs fast (default) path on the same 2 x `count` images, chunks alternating."""
    paths = {"reference": inception.InceptionFeatures(weights, batch_size=batch_size, progress=False, backend="torch"),
             "fast": inception.InceptionFeatures(weights, batch_size=batch_size, progress=False)}
    sets = {"real": torch.from_numpy(screens(count, seed=2)),
            "generated": torch.from_numpy(noisy(screens(count, seed=3), sigma=30, seed=4))}
    for extractor in paths.values():
        extractor(sets["real"][:2])  # warm-up: build (and for the fast path export) before any clock
    rates = {name: [] for name in paths}
    cpu_ms = {name: [] for name in paths}
    features = {name: {key: [] for key in sets} for name in paths}
    for key, images in sets.items():
        for start in range(0, count, chunk):
            part = images[start : start + chunk]
            for name, extractor in paths.items():
                wall, cpu = time.perf_counter(), time.process_time()
                features[name][key].append(extractor(part))
                rates[name].append(len(part) / (time.perf_counter() - wall))
                cpu_ms[name].append(1000 * (time.process_time() - cpu) / len(part))
    feats = {name: {key: torch.cat(parts) for key, parts in by_set.items()} for name, by_set in features.items()}
    ref, fast = feats["reference"], feats["fast"]
    diff = max(float((ref[k] - fast[k]).abs().max()) for k in sets)
    scale = max(float(ref[k].abs().max()) for k in sets)
    return {
        "backend": paths["fast"].backend,
        "rate": {name: statistics.median(values) for name, values in rates.items()},
        "cpu_ms": {name: statistics.median(values) for name, values in cpu_ms.items()},
        "chunks": len(rates["fast"]),
        "fid": {name: fid.fid_from_features(f["real"], f["generated"]) for name, f in feats.items()},
        "max_abs_diff": diff,
        "max_abs_feature": scale,
    }


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
            warnings.simplefilter("ignore", quality_metrics.SmallSampleWarning)
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
    parser.add_argument("--backends", action="store_true", help="(c) only: reference vs fast CPU path")
    parser.add_argument("--fid-images", type=int, default=500, help="(c): images per side")
    parser.add_argument("--chunk", type=int, default=100, help="(c): images per timed chunk")
    parser.add_argument("--threads", type=int, default=None, help="torch (and ONNX Runtime) threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load = os.getloadavg()[0]  # other work on the machine skews CPU numbers; recorded with them
    weights = inception.resolve_inception_weights(None, download=False)
    if args.backends:
        r = bench_backends(weights, args.fid_images, args.chunk, args.batch_size)
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        print(f"\nMachine: {machine(torch.device('cpu'))} · {stamp} · "
              f"threads {torch.get_num_threads()} · load average {load:.1f} at start, "
              f"{os.getloadavg()[0]:.1f} at end\n")
        ref, fast = "reference", "fast"
        print(f"| Inception on the CPU, {r['chunks']} alternating chunks of {args.chunk}, batch {args.batch_size} "
              f"| reference (torch) | fast ({r['backend']}) | ratio |")
        print("|---|---:|---:|---:|")
        print(f"| median img/s (wall) | {r['rate'][ref]:.2f} | {r['rate'][fast]:.2f} "
              f"| {r['rate'][fast] / r['rate'][ref]:.2f}x |")
        print(f"| median CPU ms per image (all threads) | {r['cpu_ms'][ref]:.0f} | {r['cpu_ms'][fast]:.0f} "
              f"| {r['cpu_ms'][ref] / r['cpu_ms'][fast]:.2f}x |")
        print(f"| FID, {args.fid_images} screens vs {args.fid_images} noisy screens | {r['fid'][ref]:.4f} "
              f"| {r['fid'][fast]:.4f} | dFID {r['fid'][fast] - r['fid'][ref]:+.5f} |")
        print(f"| features: max abs difference (max abs feature {r['max_abs_feature']:.2f}) | | "
              f"{r['max_abs_diff']:.1e} | |")
        return

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
