"""MLflow set-up shared by every stage: where runs go and which experiment they join.

Runs live in `<repo>/mlflow.db` and artifacts in `<repo>/mlruns/`, so `mlflow ui` started at the
repo root shows everything. The root is anchored even when DVC runs a queued experiment in a
temporary copy under `.dvc/tmp/exps/`, so those runs land in the same database.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

EXPERIMENT = "atari-gan"


def repo_root() -> Path:
    root = Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()
    parts = root.parts
    # A queued `dvc exp run` works in <repo>/.dvc/tmp/exps/<tmpdir>: results belong to <repo>.
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


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
