"""Stage `evaluate`: how real the trained generator's screens are, measured the standard way.

`python -m src.evaluate` loads the frozen snapshot and the generator to judge (the best
checkpoint by training-time FID if there is one, else the EMA copy, else the last generator),
draws `evaluate.num_samples` screens and writes `metrics/eval.json`: FID and KID against the
holdout frames, the FID of as many training frames against the holdout (what a perfect generator
would score with this snapshot and sample count), the sample counts and the identity of the
Inception weights. It also writes `plots/eval/grid.png` (generated screens left, real holdout
screens right) and logs all of it into the training run in MLflow.
"""

from __future__ import annotations

import csv
import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from src import fid
from src.atomic import replacing, write_json_atomic
from src.data import Snapshot, load_snapshot
from src.device import resolve_device
from src.errors import UserError, run_cli
from src.params import Params, load_params
from src.paths import MODELS_DIR, SNAPSHOT_DIR, TRAIN_PLOTS_DIR

METRICS_FILE = Path("metrics/eval.json")
GRID_FILE = Path("plots/eval/grid.png")
TRAIN_FID_CSV = TRAIN_PLOTS_DIR / "fid.csv"
RUN_FILE = "run.json"
# Which generator is judged, in order of preference.
GENERATOR_FILES = ("generator_best.pt", "generator_ema.pt", "generator.pt")
GRID_IMAGES = 32  # per side


class EvaluateError(UserError):
    pass


class SmallSampleWarning(UserWarning):
    pass


def pick_generator(models_dir: Path) -> Path:
    for name in GENERATOR_FILES:
        path = Path(models_dir) / name
        if path.is_file():
            return path
    raise EvaluateError(
        f"no generator in {models_dir}/ (looked for {', '.join(GENERATOR_FILES)}); "
        "train one first: `dvc repro train` (or `python -m src.train`)"
    )


def load_generator_file(path: Path, device: torch.device) -> tuple[nn.Module, dict]:
    from src.sample import load_generator

    try:
        return load_generator(path, device=device)
    except UserError:
        raise
    except (RuntimeError, pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, OSError) as exc:
        raise EvaluateError(
            f"{path} is not a readable generator checkpoint ({type(exc).__name__}: {exc}); "
            "retrain with `dvc repro train`"
        ) from None


def generate(generator: nn.Module, count: int, *, latent_dim: int, seed: int, device: torch.device,
             batch_size: int) -> torch.Tensor:
    from src.sample import generate_images

    generator.eval()
    return generate_images(generator, count, latent_dim=latent_dim, seed=seed, device=device, batch_size=batch_size)


def check_sample_counts(num_samples: int, snapshot: Snapshot) -> None:
    if num_samples < 2:
        raise EvaluateError(f"evaluate.num_samples = {num_samples}: FID needs at least 2 samples (a covariance)")
    for split, images in (("holdout", snapshot.holdout_images), ("train", snapshot.train_images)):
        if len(images) < 2:
            raise EvaluateError(
                f"the snapshot's {split} split has {len(images)} frame(s); FID needs at least 2. "
                "Raise collect.holdout_frames / collect.train_frames and rerun `dvc repro collect`"
            )


def evaluate_generator(generator: nn.Module, snapshot: Snapshot, extractor: fid.InceptionFeatures, *,
                       latent_dim: int, num_samples: int, kid_subset_size: int, seed: int,
                       batch_size: int = 100, cache_dir: Path | None = None) -> tuple[dict, torch.Tensor]:
    """FID/KID of `num_samples` generated screens vs the holdout, and the train-vs-holdout floor.

    Returns the metrics and the generated uint8 images. The real sides come from the FID cache.
    """
    check_sample_counts(num_samples, snapshot)
    fake = generate(generator, num_samples, latent_dim=latent_dim, seed=seed, device=extractor.device,
                    batch_size=batch_size)
    fid.check_images(fake, "generated images", shape=snapshot.image_shape)

    holdout = fid.real_features(extractor, snapshot, "holdout", cache_dir=cache_dir)
    train = fid.real_features(extractor, snapshot, "train", count=len(fake), cache_dir=cache_dir)
    scores = fid.fid_and_kid(holdout, extractor(fake, desc="Inception features (generated)"),
                             kid_subset_size, seed=seed, device=extractor.device)
    biased = min(len(fake), len(holdout), len(train)) < fid.UNBIASED_MIN_SAMPLES
    metrics = {
        **scores,
        "fid_holdout_vs_train": fid.fid_from_features(holdout, train, device=extractor.device),
        "num_generated": len(fake),
        "num_real": len(holdout),
        "num_train_for_floor": len(train),
        "biased_sample_size": biased,
        "weights_sha256": extractor.weights_sha256,
        "snapshot_sha256": snapshot.sha256,
    }
    if kid_subset_size > scores["kid_subset_size"]:
        warnings.warn(
            f"evaluate.kid_subset_size = {kid_subset_size} exceeds the sample count; KID used subsets of "
            f"{scores['kid_subset_size']} (recorded as kid_subset_size)",
            SmallSampleWarning, stacklevel=2,
        )
    if biased:
        warnings.warn(
            f"FID from {len(fake)} generated / {len(holdout)} holdout / {len(train)} training frames is biased "
            f"upwards (standard FID uses >= {fid.UNBIASED_MIN_SAMPLES}); compare it only with numbers from the same "
            "counts (recorded in metrics/eval.json)",
            SmallSampleWarning, stacklevel=2,
        )
    return metrics, fake


def best_training_fid(csv_path: Path) -> dict:
    """`{"best_train_step", "best_train_fid"}` from training's FID log; empty if there is none."""
    if not Path(csv_path).is_file():
        return {}
    rows = []
    with open(csv_path, newline="") as fh:
        for row in csv.DictReader(fh):
            try:
                rows.append((float(row["fid"]), int(float(row["step"]))))
            except (KeyError, TypeError, ValueError):
                continue  # a half-written last line of an interrupted run
    rows = [r for r in rows if np.isfinite(r[0])]
    if not rows:
        return {}
    best_fid, best_step = min(rows)
    return {"best_train_step": best_step, "best_train_fid": best_fid}


def save_grid(fake: torch.Tensor, real: np.ndarray | torch.Tensor, path: Path, count: int = GRID_IMAGES) -> Path:
    """Generated screens (left) beside real ones (right), 8 per row, written atomically."""
    from torchvision.utils import make_grid, save_image

    pick = np.linspace(0, len(real) - 1, min(count, len(real))).astype(int)  # spread over all games
    real = torch.as_tensor(np.ascontiguousarray(real[pick]))
    left = make_grid(fake[:count].float() / 255, nrow=8, padding=2, pad_value=1.0)
    right = make_grid(real.float() / 255, nrow=8, padding=2, pad_value=1.0)
    height = max(left.shape[1], right.shape[1])
    pad = lambda g: torch.nn.functional.pad(g, (0, 0, 0, height - g.shape[1]), value=1.0)  # noqa: E731
    gap = torch.ones(3, height, 12)
    path = Path(path)
    with replacing(path) as tmp:
        save_image(torch.cat([pad(left), gap, pad(right)], dim=2), tmp, format="png")
    return path


def log_to_mlflow(metrics: dict, grid: Path, run_file: Path) -> str:
    """Log into the training run named in `run_file`; a new run (with a warning) if it is unknown."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from src.tracking import run_tags, setup

    setup()
    run_id = None
    if Path(run_file).is_file():
        try:
            recorded = json.loads(Path(run_file).read_text())
            run_id = recorded.get("mlflow_run_id")
        except (ValueError, AttributeError):
            run_id = None
    run = None
    if run_id:
        try:
            run = mlflow.start_run(run_id=run_id)
        except MlflowException:
            warnings.warn(f"MLflow run {run_id} from {run_file} is unknown to {mlflow.get_tracking_uri()}; "
                          "logging the evaluation into a new run", stacklevel=2)
    else:
        warnings.warn(f"no training run id in {run_file}; logging the evaluation into a new run", stacklevel=2)
    if run is None:
        run = mlflow.start_run(run_name="evaluate", tags=run_tags())
    with run:
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        mlflow.log_metrics({f"eval/{k}": v for k, v in numbers.items()})
        mlflow.set_tags({
            "eval.generator_file": str(metrics["generator_file"]),
            "eval.weights_sha256": metrics["weights_sha256"],
            "eval.biased_sample_size": str(metrics["biased_sample_size"]),
        })
        mlflow.log_dict(metrics, "eval/eval.json")
        mlflow.log_artifact(str(grid), artifact_path="eval")
        return run.info.run_id


def run_evaluation(params: Params, *, snapshot_dir: Path = SNAPSHOT_DIR, models_dir: Path = MODELS_DIR,
                   metrics_file: Path = METRICS_FILE, grid_file: Path = GRID_FILE,
                   train_fid_csv: Path = TRAIN_FID_CSV, cache_dir: Path | None = None,
                   progress: bool = True) -> dict:
    """Everything but MLflow: check inputs, measure, then write the grid and `metrics_file`."""
    ev = params.evaluate
    device = resolve_device(ev.device, key="evaluate.device")
    snapshot = load_snapshot(snapshot_dir)
    check_sample_counts(ev.num_samples, snapshot)
    generator_path = pick_generator(models_dir)
    weights = fid.resolve_inception_weights(ev.inception_weights)
    extractor = fid.InceptionFeatures(weights, device=device, batch_size=ev.batch_size, progress=progress)
    extractor.net  # noqa: B018  fail on unreadable weights before any generation
    generator, meta = load_generator_file(generator_path, device)
    if "latent_dim" not in meta:
        raise EvaluateError(f"{generator_path} has no latent_dim in its metadata; retrain with `dvc repro train`")
    metrics, fake = evaluate_generator(
        generator, snapshot, extractor, latent_dim=int(meta["latent_dim"]), num_samples=ev.num_samples,
        kid_subset_size=ev.kid_subset_size, seed=params.seed, batch_size=ev.batch_size, cache_dir=cache_dir,
    )
    metrics = {**metrics, "generator_file": generator_path.name, **best_training_fid(train_fid_csv)}
    save_grid(fake, snapshot.holdout_images, grid_file)
    write_json_atomic(metrics_file, metrics)
    return metrics


def main() -> None:
    params = load_params()
    metrics = run_evaluation(params)
    run_id = log_to_mlflow(metrics, GRID_FILE, MODELS_DIR / RUN_FILE)
    print(
        f"FID {metrics['fid']:.2f}  KID {metrics['kid_mean']:.4f} ± {metrics['kid_std']:.4f}  "
        f"(floor: holdout vs train FID {metrics['fid_holdout_vs_train']:.2f}; "
        f"{metrics['num_generated']} generated vs {metrics['num_real']} holdout; {metrics['generator_file']}) "
        f"-> {METRICS_FILE}, {GRID_FILE}, MLflow run {run_id}"
    )


if __name__ == "__main__":
    run_cli(main)
