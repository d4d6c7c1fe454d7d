"""Stage `evaluate`: how real the trained generator's screens are, measured the standard way.

`python -m src.evaluate` loads the frozen snapshot and the generator to judge (the best
checkpoint by training-time FID if there is one, else the EMA copy, else the last generator),
refuses one trained on another snapshot, draws `evaluate.num_samples` screens from their own latent
stream (not the one that picked the best step) and writes `metrics/eval.json`: FID and KID against
the holdout frames; with a palette, the same latents drawn without it (`fid_raw`) or with it
(`fid_palette`) and the palette-snapped training frames' FID (`fid_floor_palette`, and per game); the FID of as
many training frames against the holdout (what a perfect generator would score with this snapshot
and sample count); precision/recall and density/coverage, with the same four for those training frames
(`*_train_frames`: the top of their scale); the share of screens a game classifier (src/coverage.py)
assigns to each game against the snapshot's, per-game FID and, for a game-conditional generator,
the share of screens showing the game they were drawn for (`label_agreement`); the sample counts and
the identity of the Inception weights (the per-set metrics are src/quality_metrics.py's). docs/quality.md says
what each number can and cannot tell. It also writes `plots/eval/grid.png` (generated screens
left, real holdout screens right) and logs all of it into the training run in MLflow.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import pickle
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from src import fid, inception
from src.atomic import replacing, write_json_atomic
from src.data import Snapshot, load_snapshot
from src.device import resolve_device
from src.errors import UserError, run_cli, stage_parser
from src.generator import check_can_draw, generate_images, load_generator, pick_generator, requested_labels
from src.lock import project_lock
from src.params import Params, load_params
from src.profile import apply_profile
from src.quality_metrics import SmallSampleWarning, real_scale, set_metrics
from src.timing import Stopwatch
from src.tracking import check_store, logged_after_work
from src.paths import MODELS_DIR, SNAPSHOT_DIR, TRAIN_PLOTS_DIR

METRICS_FILE = Path("metrics/eval.json")
GRID_FILE = Path("plots/eval/grid.png")
TRAIN_FID_CSV = TRAIN_PLOTS_DIR / "fid.csv"
RUN_FILE = "run.json"
GRID_IMAGES = 32  # per side
MIN_GAME_SAMPLES = 50  # generated screens a game needs for its per-game FID to be scored


class EvaluateError(UserError):
    pass


def load_generator_file(path: Path, device: torch.device) -> tuple[nn.Module, dict]:
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
    generator.eval()
    return generate_images(generator, count, latent_dim=latent_dim, seed=seed, device=device, batch_size=batch_size)


class Drawn(nn.Module):
    """`generator` with its palette off (`palette` None) or replaced by `palette`: the same weights and latents.

    Puts the generator's own palette back on exit, so use it in a `with` block.
    """

    def __init__(self, generator: nn.Module, palette: torch.Tensor | None):
        super().__init__()
        self.generator, self.palette = generator, palette
        self.num_classes = getattr(generator, "num_classes", 0)
        if self.num_classes:
            self.class_freq = generator.class_freq
        self._saved = getattr(generator, "palette_size", 0)

    def __enter__(self) -> Drawn:
        self.generator.palette_size = 0  # Generator.forward snaps only when palette_size > 0
        return self

    def __exit__(self, *exc) -> None:
        self.generator.palette_size = self._saved

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        from src.models import snap_to_palette

        x = self.generator(z) if labels is None else self.generator(z, labels)
        return x if self.palette is None else snap_to_palette(x, self.palette.to(x.device))


def check_sample_counts(num_samples: int, snapshot: Snapshot) -> None:
    if num_samples < 2:
        raise EvaluateError(f"evaluate.num_samples = {num_samples}: FID needs at least 2 samples (a covariance)")
    for split, images in (("holdout", snapshot.holdout_images), ("train", snapshot.train_images)):
        if len(images) < 2:
            raise EvaluateError(
                f"the snapshot's {split} split has {len(images)} frame(s); FID needs at least 2. "
                "Raise collect.holdout_frames / collect.train_frames and rerun `dvc repro collect`"
            )


def check_snapshot(recorded: str | None, snapshot: Snapshot, generator_path: Path) -> None:
    """Refuse a generator trained on another snapshot: its FID and its MLflow run belong to that one."""
    if recorded and recorded != snapshot.sha256:
        raise EvaluateError(
            f"{generator_path} was trained on snapshot {recorded[:12]}…, but the snapshot here is "
            f"{snapshot.sha256[:12]}…; retrain on this snapshot (`dvc repro train`), or bring back the one it "
            "was trained on (`dvc checkout data/snapshot`)"
        )


def train_subset_labels(snapshot: Snapshot, count: int) -> np.ndarray:
    """The game labels of the `count` training frames fid.real_features scores (its fixed subset, or all)."""
    labels = np.asarray(snapshot.train_labels)
    index = fid.real_selection(len(labels), count)
    return labels if index is None else labels[index]


def game_floors(games: list[str], holdout: torch.Tensor, holdout_labels: np.ndarray, train: torch.Tensor,
                train_labels: np.ndarray, device: str | torch.device = "cpu") -> dict[str, float | None]:
    """What a perfect generator would score per game at these counts: each game's training frames (features
    `train`, raw or palette-snapped) against its holdout frames; None where a game has fewer than 2 of either."""
    floors = {}
    for g, game in enumerate(games):
        mine, real = train[torch.from_numpy(train_labels == g)], holdout[torch.from_numpy(holdout_labels == g)]
        floors[game] = fid.fid_from_features(real, mine, device=device) if len(mine) >= 2 and len(real) >= 2 else None
    return floors


def evaluate_generator(generator: nn.Module, snapshot: Snapshot, extractor: inception.InceptionFeatures, *,
                       latent_dim: int, num_samples: int, kid_subset_size: int, seed: int,
                       batch_size: int = 100, cache_dir: Path | None = None, palette_size: int = 0,
                       coverage_cache_dir: Path | None = None,
                       min_game_samples: int | None = None) -> tuple[dict, torch.Tensor]:
    """Every number of metrics/eval.json for `num_samples` screens of `generator`; returns them and the screens.

    The screens are drawn from the "evaluate" latent stream of `seed` (fid.latent_seed). `fid` and
    the unsuffixed metrics are of the generator as shipped. With a palette (the generator's own, or
    else the `palette_size` commonest training colours), the same latents are also drawn the other
    way (`_raw`: palette off; `_palette`: palette applied) and `fid_floor_palette` scores
    palette-snapped training frames. Each image set goes through Inception once.
    """
    from src import coverage
    from src.models import palette_of

    check_sample_counts(num_samples, snapshot)
    min_game_samples = MIN_GAME_SAMPLES if min_game_samples is None else min_game_samples
    classifier = coverage.game_classifier(snapshot, cache_dir=coverage_cache_dir)
    noise = fid.latent_seed(seed, "evaluate")
    draw = lambda g: generate(g, num_samples, latent_dim=latent_dim, seed=noise, device=extractor.device,  # noqa: E731
                              batch_size=batch_size)
    fake = draw(generator)
    inception.check_images(fake, "generated images", shape=snapshot.image_shape)
    shipped_palette = int(getattr(generator, "palette_size", 0))
    palette = None
    if shipped_palette:
        palette = generator.palette.detach().cpu()
    elif palette_size:
        palette = palette_of(snapshot.train_images, palette_size)
    other, other_suffix = None, ""
    if palette is not None:
        with Drawn(generator, None if shipped_palette else palette) as drawn:
            other = draw(drawn)
        other_suffix = "_raw" if shipped_palette else "_palette"

    holdout = fid.real_features(extractor, snapshot, "holdout", cache_dir=cache_dir)
    train = fid.real_features(extractor, snapshot, "train", count=len(fake), cache_dir=cache_dir)
    fake_features = extractor(fake, desc="Inception features (generated)")
    scores = fid.fid_and_kid(holdout, fake_features, kid_subset_size, seed=seed, device=extractor.device)
    biased = min(len(fake), len(holdout), len(train)) < fid.UNBIASED_MIN_SAMPLES
    games = snapshot.games
    holdout_labels = np.asarray(snapshot.holdout_labels)
    prc_index = fid.real_selection(len(holdout), len(fake))  # as many real as generated: k-NN radii depend on it
    common = dict(games=games, holdout_labels=holdout_labels, classifier=classifier, prc_index=prc_index,
                  min_game_samples=min_game_samples, device=extractor.device)
    metrics = {
        **scores,
        **set_metrics(fake_features, fake, holdout, **common),
        "post_processing": f"palette{len(palette)}" if shipped_palette else "none",
        "fid_holdout_vs_train": fid.fid_from_features(holdout, train, device=extractor.device),
        # as many training frames as generated screens, against the same holdout frames and k
        **real_scale(train, holdout if prc_index is None else holdout[torch.from_numpy(prc_index)]),
    }
    if getattr(generator, "num_classes", 0):  # is each screen the game it was drawn for?
        asked = requested_labels(generator, len(fake)).numpy()
        metrics["label_agreement"] = float((classifier.predict(fake) == asked).mean())
    floors = dict(games=games, holdout=holdout, holdout_labels=holdout_labels,
                  train_labels=train_subset_labels(snapshot, len(fake)),
                  device=extractor.device)
    metrics.update({f"fid_game_floor/{game}": v for game, v in game_floors(train=train, **floors).items()})
    if other is not None:
        other_features = extractor(other, desc=f"Inception features (generated, {other_suffix[1:]})")
        metrics.update(set_metrics(other_features, other, holdout, **common, suffix=other_suffix))
        snapped = fid.real_features(extractor, snapshot, "train", count=len(fake), cache_dir=cache_dir, palette=palette)
        metrics["palette_size"] = len(palette)
        # Both drawings under their own names, whichever one is shipped: like-for-like tables read these.
        metrics["fid_palette" if shipped_palette else "fid_raw"] = metrics["fid"]
        metrics["fid_floor_palette"] = fid.fid_from_features(holdout, snapped, device=extractor.device)
        metrics.update({f"fid_game_floor_palette/{game}": v
                        for game, v in game_floors(train=snapped, **floors).items()})
    for g, game in enumerate(games):
        metrics[f"coverage_share_snapshot/{game}"] = float(coverage.shares(holdout_labels, len(games))[g])
    metrics.update({
        "classifier_holdout_accuracy": classifier.holdout_accuracy,
        "num_generated": len(fake),
        "num_real": len(holdout),
        "num_train_for_floor": len(train),
        "num_real_for_prc": len(holdout) if prc_index is None else len(prc_index),
        "biased_sample_size": biased,
        "latent_stream": "evaluate",
        "weights_sha256": extractor.weights_sha256,
        "snapshot_sha256": snapshot.sha256,
    })
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
    run_id, why = None, f"{run_file} is missing"
    if Path(run_file).is_file():
        try:
            recorded = json.loads(Path(run_file).read_text())
            run_id = recorded.get("mlflow_run_id")
            why = f"{run_file} names no mlflow_run_id"
        except (ValueError, AttributeError):
            why = f"{run_file} is not readable JSON"
    run = None
    if run_id:
        try:
            run = mlflow.start_run(run_id=run_id)
        except MlflowException:
            warnings.warn(f"MLflow run {run_id} from {run_file} is unknown to {mlflow.get_tracking_uri()}; "
                          "logging the evaluation into a new run", stacklevel=2)
    else:
        warnings.warn(f"no training run to log into ({why}); logging the evaluation into a new run", stacklevel=2)
    if run is None:
        run = mlflow.start_run(run_name="evaluate", tags=run_tags())
    with run:
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        mlflow.log_metrics({f"eval/{k}": v for k, v in numbers.items()})
        mlflow.set_tags({
            "eval.generator_file": str(metrics["generator_file"]),
            "eval.weights_sha256": metrics["weights_sha256"],
            "eval.biased_sample_size": str(metrics["biased_sample_size"]),
            "eval.post_processing": str(metrics.get("post_processing", "")),
        })
        mlflow.log_dict(metrics, "eval/eval.json")
        mlflow.log_artifact(str(grid), artifact_path="eval")
        return run.info.run_id


def recorded_snapshot(run_file: Path) -> str | None:
    """The snapshot digest `src.train` recorded in models/run.json, if any."""
    try:
        recorded = json.loads(Path(run_file).read_text())
        return recorded.get("snapshot_sha256") if isinstance(recorded, dict) else None
    except (OSError, ValueError):
        return None


def holdout_subset(snapshot: Snapshot, count: int | None) -> Snapshot:
    """`snapshot` with its holdout cut to a fixed random subset of `count` frames (None or more: all)."""
    if count is not None and count > len(snapshot.holdout_images):
        warnings.warn(f"evaluate.holdout_samples = {count} is more than the snapshot's "
                      f"{len(snapshot.holdout_images)} holdout frames; all of them are scored", stacklevel=2)
    index = fid.real_selection(len(snapshot.holdout_images), count)
    if index is None:
        return snapshot
    return dataclasses.replace(snapshot, holdout_images=snapshot.holdout_images[index],
                               holdout_labels=snapshot.holdout_labels[index])


def run_evaluation(params: Params, *, snapshot_dir: Path = SNAPSHOT_DIR, models_dir: Path = MODELS_DIR,
                   metrics_file: Path = METRICS_FILE, grid_file: Path = GRID_FILE,
                   train_fid_csv: Path = TRAIN_FID_CSV, cache_dir: Path | None = None,
                   progress: bool = True, watch: Stopwatch | None = None) -> dict:
    """Everything but MLflow: check inputs, measure, then write the grid and `metrics_file`."""
    ev = params.evaluate
    watch = watch or Stopwatch()
    device = resolve_device(ev.device, key="evaluate.device")
    with watch.section("data"):
        snapshot = holdout_subset(load_snapshot(snapshot_dir), ev.holdout_samples)
    check_sample_counts(ev.num_samples, snapshot)
    check_can_draw(ev.num_samples)  # before the Inception weights load
    generator_path = pick_generator(models_dir)
    weights = inception.resolve_inception_weights(ev.inception_weights)
    extractor = inception.InceptionFeatures(weights, device=device, batch_size=ev.batch_size, progress=progress)
    extractor.net  # noqa: B018  fail on unreadable weights before any generation
    generator, meta = load_generator_file(generator_path, device)
    if "latent_dim" not in meta:
        raise EvaluateError(f"{generator_path} has no latent_dim in its metadata; retrain with `dvc repro train`")
    check_snapshot(meta.get("snapshot_sha256") or recorded_snapshot(Path(models_dir) / RUN_FILE), snapshot,
                   generator_path)
    with watch.section("measuring"):
        metrics, fake = evaluate_generator(
            generator, snapshot, extractor, latent_dim=int(meta["latent_dim"]), num_samples=ev.num_samples,
            kid_subset_size=ev.kid_subset_size, seed=params.seed, batch_size=ev.batch_size, cache_dir=cache_dir,
            # params.yaml's value, before the article recipe turns it off: the article's screens are then
            # also scored with the palette (fid_palette), like for like with the default's.
            palette_size=params.model.palette_size,
            coverage_cache_dir=None if cache_dir is None else Path(cache_dir).parent / "coverage",
        )
    metrics = {**metrics, "profile": params.profile, "generator_file": generator_path.name,
               **best_training_fid(train_fid_csv)}
    with watch.section("writing"):
        save_grid(fake, snapshot.holdout_images, grid_file)
        write_json_atomic(metrics_file, metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    stage_parser("python -m src.evaluate", __doc__).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # The profile's values, not `effective`: the article recipe's palette_size 0 would hide params.yaml's
    # palette, with which its screens are also scored (fid_palette), like for like with the default's.
    params = apply_profile(load_params())
    watch = Stopwatch()
    with project_lock():
        check_store()  # before any work: a store that cannot be used costs nothing
        metrics = run_evaluation(params, watch=watch)
        with watch.section("mlflow"):
            run_id = logged_after_work(log_to_mlflow, metrics, GRID_FILE, MODELS_DIR / RUN_FILE,
                                       what="logging the evaluation", relog="run `python -m src.evaluate` again")
    raw = f"  raw FID {metrics['fid_raw']:.2f}" if "fid_raw" in metrics else ""
    palette = f"  palette FID {metrics['fid_palette']:.2f}" if "fid_palette" in metrics else ""
    agree = f", label agreement {metrics['label_agreement']:.3f}" if "label_agreement" in metrics else ""
    spread = "(whole sample: no spread)" if metrics["kid_std"] is None else f"± {metrics['kid_std']:.4f}"
    print(
        f"FID {metrics['fid']:.2f} ({metrics['post_processing']}){raw}{palette}  KID {metrics['kid_mean']:.4f} {spread}  "
        f"precision {metrics['precision']:.3f} recall {metrics['recall']:.3f} density {metrics['density']:.3f} "
        f"coverage {metrics['coverage']:.3f}  game shares TV {metrics['coverage_tv']:.3f}{agree}  "
        f"(real vs real: FID {metrics['fid_holdout_vs_train']:.2f}, precision {metrics['precision_train_frames']:.3f} "
        f"recall {metrics['recall_train_frames']:.3f} density {metrics['density_train_frames']:.3f} "
        f"coverage {metrics['coverage_train_frames']:.3f}; "
        f"{metrics['num_generated']} generated vs {metrics['num_real']} holdout; {metrics['generator_file']}) "
        f"-> {METRICS_FILE}, {GRID_FILE}" + (f", MLflow run {run_id}" if run_id else " (not logged to MLflow)")
    )
    print(watch.summary())


if __name__ == "__main__":
    run_cli(main)
