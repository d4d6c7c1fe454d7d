"""The train stage's DVC outputs: generator/discriminator files, run.json, metrics/train.json, plots."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from src.atomic import save_torch_atomic, write_csv_atomic, write_json_atomic
from src.data import Snapshot
from src.models import cpu_state, eval_mode, model_kwargs
from src.params import IMAGE_SHAPE, Params, flatten
from src.paths import MODELS_DIR, TRAIN_METRICS_FILE, TRAIN_PLOTS_DIR
from src.training.loss import LOSS_KEYS

if TYPE_CHECKING:
    from src.training.loop import TrainResult


def generator_payload(state: dict[str, torch.Tensor], params: Params, step: int, kind: str,
                      games: list[str] | None = None, snapshot_sha256: str | None = None) -> dict[str, Any]:
    """What a generator file holds: enough to rebuild and run it without params.yaml.

    `games`: the games of the snapshot it learned; recorded as `collect.games`, which `src.sample`
    and `src.evaluate` read (params.yaml may name others when the snapshot was not rebuilt).
    `snapshot_sha256`: that snapshot's digest, which evaluate checks against the current one.
    """
    recorded = flatten(params)
    if games is not None:
        recorded["collect.games"] = list(games)
    return {
        "kind": "generator",
        "variant": kind,
        "state_dict": state,
        "model": model_kwargs(params)["generator"],
        "latent_dim": params.model.latent_dim,
        "image_shape": list(IMAGE_SHAPE),
        "step": step,
        "params": recorded,
        **({"snapshot_sha256": snapshot_sha256} if snapshot_sha256 else {}),
    }


def write_outputs(
    result: TrainResult,
    params: Params,
    snapshot: Snapshot,
    *,
    run_ids: dict[str, str | None] | None = None,
    seconds: dict[str, float] | None = None,
    root: Path = Path("."),
) -> dict[str, Path]:
    """Write the DVC outputs of the stage (models, metrics, plots), each file atomically."""
    root = Path(root)
    written = write_models(result, params, snapshot, root / MODELS_DIR, run_ids or {})
    write_json_atomic(root / TRAIN_METRICS_FILE, train_metrics(result, params, seconds or result.seconds))
    written["metrics"] = root / TRAIN_METRICS_FILE
    written.update(write_plots(result, params, root / TRAIN_PLOTS_DIR))
    return written


def write_models(result: TrainResult, params: Params, snapshot: Snapshot, models: Path,
                 run_ids: dict[str, str | None]) -> dict[str, Path]:
    """models/: the last, EMA and best generators, the discriminator and run.json."""
    written: dict[str, Path] = {}

    def save_generator(name: str, state: dict[str, torch.Tensor] | None, step: int) -> None:
        path = models / name
        if state is None:
            path.unlink(missing_ok=True)  # no stale file from an earlier run with other settings
            return
        save_torch_atomic(path, generator_payload(state, params, step, name.removesuffix(".pt"), games=snapshot.games,
                                                  snapshot_sha256=snapshot.sha256))
        written[name] = path

    save_generator("generator.pt", cpu_state(result.generator), result.iterations)
    ema = result.ema_generator
    save_generator("generator_ema.pt", cpu_state(ema) if ema is not None else None, result.iterations)
    save_generator("generator_best.pt", result.best_state, result.best_step or 0)
    save_torch_atomic(
        models / "discriminator.pt",
        {"kind": "discriminator", "state_dict": cpu_state(result.discriminator),
         "model": model_kwargs(params)["discriminator"], "image_shape": list(IMAGE_SHAPE), "step": result.iterations},
    )
    written["discriminator.pt"] = models / "discriminator.pt"
    write_json_atomic(
        models / "run.json",
        {
            "mlflow_run_id": run_ids.get("run_id"),
            "mlflow_experiment_id": run_ids.get("experiment_id"),
            "params": params.model_dump(),
            "snapshot_sha256": snapshot.sha256,
            "eval_generator": "generator_ema.pt" if ema is not None else "generator.pt",
            "iterations": result.iterations,
            "world_size": result.world_size,
            "device": result.device,
        },
    )
    written["run.json"] = models / "run.json"
    return written


def train_metrics(result: TrainResult, params: Params, seconds: dict[str, float]) -> dict[str, Any]:
    """metrics/train.json: the profile and the scale it set, speed, the time breakdown, final window
    losses and, when FID was measured, the best step."""
    t = params.train
    metrics: dict[str, Any] = {
        "profile": params.profile,
        "settings": {"iterations": t.iterations, "time_budget_s": t.time_budget_s, "batch_size": t.batch_size,
                     "fid_every": t.fid_every, "fid_samples": t.fid_samples, "image_every": t.image_every},
        "iterations": result.iterations,
        "elapsed_s": round(result.elapsed_s, 3),
        "images_per_s": round(result.images_per_s, 2),
        "stopped_by_time_budget": result.stopped_by == "time_budget",
        "time_s": seconds,
        **{k: result.losses[k] for k in LOSS_KEYS if k in result.losses},
    }
    if result.best_fid is not None:
        metrics.update(best_fid=result.best_fid, best_step=result.best_step)
    return metrics


def write_plots(result: TrainResult, params: Params, plots: Path) -> dict[str, Path]:
    """plots/train/: losses.csv, fid.csv (only when FID was measured) and a grid of samples."""
    from src.generator import GRID_SIZE, generate_images, write_grid

    written: dict[str, Path] = {}
    write_csv_atomic(plots / "losses.csv", ["step", *LOSS_KEYS], result.loss_history)
    written["losses.csv"] = plots / "losses.csv"
    if result.fid_history:
        write_csv_atomic(plots / "fid.csv", ["step", "fid"], result.fid_history)
        written["fid.csv"] = plots / "fid.csv"
    else:
        (plots / "fid.csv").unlink(missing_ok=True)
    device = next(result.eval_generator.parameters()).device
    with eval_mode(result.eval_generator) as gen:
        images = generate_images(gen, GRID_SIZE, latent_dim=params.model.latent_dim, seed=params.seed, device=device)
    written["samples.png"] = write_grid(images, plots / "samples.png")
    return written
