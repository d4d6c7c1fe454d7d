"""Set-up shared by every test module."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    # On 2 shared cores a second OpenMP thread spin-waits against other jobs: measured here under
    # load, Inception ran 4.5 img/s with 1 thread vs 3.0 with 2, and a 2048-d FID took 4 s vs 10-25 s.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --- a tiny project folder and the real CLIs, for subprocess tests (bad inputs, tune workers) ----

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from src.params import REPO_ROOT  # noqa: E402

# Small enough that a tune trial or a training run costs seconds on 2 CPU cores.
TINY_PARAMS = {
    "collect": {"games": ["Breakout-v4"], "train_frames": 32, "holdout_frames": 12, "workers": 1, "shard_frames": 50},
    "model": {"latent_dim": 16, "gen_filters": 8, "disc_filters": 8, "palette_size": 0},
    "train": {"device": "cpu", "iterations": 4, "batch_size": 8, "log_every": 2, "checkpoint_every": 1000,
              "precision": "fp32", "fid_every": 0, "image_every": 1000, "ema_warmup": 0},
    "evaluate": {"num_samples": 16, "batch_size": 16, "device": "cpu", "kid_subset_size": 4},
    "tune": {"n_trials": 2, "iterations": 4, "report_every": 2, "fid_samples": 8, "pruner": "none"},
}


def write_tiny_snapshot(path: Path, n_train: int = 32, n_holdout: int = 12) -> Path:
    from src.data import write_snapshot

    rng = np.random.default_rng(0)
    return write_snapshot(
        path,
        {"train_images": rng.integers(0, 256, (n_train, 3, 64, 64), dtype=np.uint8),
         "train_labels": np.zeros(n_train, np.uint8),
         "holdout_images": rng.integers(0, 256, (n_holdout, 3, 64, 64), dtype=np.uint8),
         "holdout_labels": np.zeros(n_holdout, np.uint8)},
        {"games": ["Breakout-v4"]},
    )


def edit_params(path: Path, values: dict) -> None:
    """Set dotted keys (`{"train.recipe": "article"}`) in a params file as YAML; None deletes the key."""
    raw = yaml.safe_load(path.read_text()) or {}
    for key, value in values.items():
        *sections, name = key.split(".")
        node = raw
        for section in sections:
            node = node.setdefault(section, {})
        if value is None:
            node.pop(name, None)
        else:
            node[name] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture
def tiny_project(tmp_path) -> Path:
    """A project folder: the shipped params.yaml with tiny values, and a tiny snapshot."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    edit_params(project / "params.yaml", {f"{s}.{k}": v for s, kv in TINY_PARAMS.items() for k, v in kv.items()})
    write_tiny_snapshot(project / "data" / "snapshot")
    return project


def cli_env(project: Path) -> dict[str, str]:
    # This checkout's src first; results stay inside the project folder.
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1",
            "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}


def run_module(module: str, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m src.<module> args...` in `cwd`, as a user would run it."""
    return subprocess.run([sys.executable, "-m", f"src.{module}", *args], cwd=cwd, env=cli_env(cwd),
                          capture_output=True, text=True, timeout=timeout)
