"""MLflow: where runs go and which experiment they join (every stage), and the train stage's run.

Runs live in `<repo>/mlflow.db` and artifacts in `<repo>/mlruns/`, so `mlflow ui` started at the
repo root shows everything. The root is anchored even when DVC runs a queued experiment in a
temporary copy under `.dvc/tmp/exps/`, so those runs land in the same database.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import logging
import math
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from src.paths import repo_root

if TYPE_CHECKING:
    import torch

    from src.data import Snapshot
    from src.params import Params
    from src.training.loop import TrainResult

log = logging.getLogger(__name__)

EXPERIMENT = "atari-gan"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


@contextlib.contextmanager
def _creation_lock(uri: str) -> Iterator[None]:
    """Serialise first use of a SQLite tracking database across processes.

    MLflow creates and migrates the schema on first connection; two processes doing it at once
    (parallel tuning workers, queued DVC experiments) corrupt each other's migration.
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock_path = Path(uri.removeprefix("sqlite:///") + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@functools.cache
def _setup(uri: str, experiment: str, artifact_root: str) -> str:
    with _creation_lock(uri):
        return _get_or_create_experiment(uri, experiment, artifact_root)


def _get_or_create_experiment(uri: str, experiment: str, artifact_root: str) -> str:
    import mlflow

    mlflow.set_tracking_uri(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    try:
        return mlflow.create_experiment(experiment, artifact_location=f"{artifact_root}/{experiment}")
    except Exception:  # another process created it first
        found = mlflow.get_experiment_by_name(experiment)
        if found is None:
            raise
        return found.experiment_id


def setup(experiment: str = EXPERIMENT) -> str:
    """Point MLflow at the repo's database and return the experiment id (creating it once)."""
    import mlflow

    uri = tracking_uri()
    experiment_id = _setup(uri, experiment, (repo_root() / "mlruns").as_uri())
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo_root(), capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def run_tags() -> dict[str, str]:
    """Tags every run carries: code version and, when DVC runs the stage, the experiment name."""
    tags = {"git_commit": git_commit()}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


class TrainingRun:
    """The stage's MLflow run: one per training, resumed with the training when params match."""

    def __init__(self, params: Params, snapshot: Snapshot, device: torch.device, world: int, resume_id: str | None):
        import mlflow
        from mlflow.tracking import MlflowClient

        from src.device import device_label
        from src.params import flatten

        self.experiment_id = setup()
        self.client = MlflowClient()
        flat = {k: str(v) for k, v in flatten(params).items()}
        run_id = resume_id if resume_id and self._same_params(resume_id, flat) else None
        tags = {
            **run_tags(),
            "snapshot_sha256": snapshot.sha256,
            "device": device_label(device),
            "recipe": params.train.recipe,
            "profile": params.profile,
            "world_size": str(world),
        }
        if resume_id and run_id is None:
            tags["resumed_from_run"] = resume_id
        system = importlib.util.find_spec("psutil") is not None
        self.run = mlflow.start_run(run_id=run_id, experiment_id=self.experiment_id, tags=tags,
                                    log_system_metrics=system)
        self.run_id = self.run.info.run_id
        if run_id is None:
            mlflow.log_params(flatten(params))
        else:
            log.info("continuing MLflow run %s", run_id)

    def _same_params(self, run_id: str, flat: dict[str, str]) -> bool:
        try:
            logged = self.client.get_run(run_id).data.params
        except Exception:  # deleted run or another database
            return False
        return logged == flat

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(v)]
        self.client.log_batch(self.run_id, metrics=batch, synchronous=True)

    def log_images(self, step: int, real: torch.Tensor, fake: torch.Tensor) -> None:
        import mlflow
        from torchvision.utils import make_grid

        for key, batch in (("real", real), ("fake", fake)):
            grid = make_grid(batch, nrow=8, padding=2).permute(1, 2, 0).numpy()
            mlflow.log_image(grid, key=key, step=step)

    def finish(self, result: TrainResult, params: Params, written: dict[str, Path]) -> None:
        import mlflow
        import mlflow.pytorch
        import numpy as np
        import torch

        from src.models import Generator, cpu_state, model_kwargs

        final = {"images_per_s": result.images_per_s, "train_seconds": result.elapsed_s}
        if result.best_fid is not None:
            final.update(best_fid=result.best_fid)
        self.log_metrics(result.iterations, final)
        for name in ("metrics", "losses.csv", "fid.csv", "samples.png"):
            if name in written:
                mlflow.log_artifact(str(written[name]), artifact_path="train")
        # Logged from a fresh CPU copy in fp32 and contiguous layout, so the exported model loads anywhere.
        gen = Generator(**model_kwargs(params)["generator"])
        gen.load_state_dict(cpu_state(result.eval_generator))
        gen.eval()
        # A batch of 4: torch.export would specialise a batch dimension of 1 and accept nothing else.
        example = torch.randn(4, params.model.latent_dim, 1, 1, generator=torch.Generator().manual_seed(0)).numpy()
        requirements = [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]
        mlflow.pytorch.log_model(gen, name="generator", input_example=example, pip_requirements=requirements)

    def end(self, status: str) -> None:
        import mlflow

        mlflow.end_run(status=status)
