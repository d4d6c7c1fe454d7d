"""Set-up shared by every test module: one thread, tiny snapshots, the Inception weights, tiny params."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from src.data import Snapshot, load_snapshot, write_snapshot
from src.params import REPO_ROOT, Params, parse_params

# A model and training run small enough for a CPU test: seconds, not minutes.
TINY_MODEL = {"latent_dim": 16, "gen_filters": 8, "disc_filters": 8}
TINY_TRAIN = {"batch_size": 8, "iterations": 20, "log_every": 5, "checkpoint_every": 10, "precision": "fp32",
              "ema_warmup": 5, "image_every": 1000, "fid_every": 0}

Frames = Callable[[int, int, int], np.ndarray]  # (count, seed, size) -> uint8 (count, 3, size, size)


@pytest.fixture(autouse=True)
def one_thread():
    # On 2 shared cores a second OpenMP thread spin-waits against other jobs: measured here under
    # load, Inception ran 4.5 img/s with 1 thread vs 3.0 with 2, and a 2048-d FID took 4 s vs 10-25 s.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny(**train_overrides) -> Params:
    """TINY_MODEL and TINY_TRAIN, with `train.*` overrides."""
    return parse_params({"model": TINY_MODEL, "train": {**TINY_TRAIN, **train_overrides}})


def write_tiny_snapshot(path: Path, n_train: int = 48, n_holdout: int = 16, *, size: int = 64, seed: int = 0,
                        games: tuple[str, ...] = ("Pong-v4",), frames: Frames | None = None) -> Path:
    """A snapshot of `n_train` + `n_holdout` frames, labelled with each of `games` in turn: uniform noise, or
    `frames(n, seed, size)`."""
    if frames is None:
        rng = np.random.default_rng(seed)
        train = rng.integers(0, 256, (n_train, 3, size, size), dtype=np.uint8)
        holdout = rng.integers(0, 256, (n_holdout, 3, size, size), dtype=np.uint8)
    else:
        train, holdout = frames(n_train, seed, size), frames(n_holdout, seed + 1000, size)
    arrays = {"train_images": train, "train_labels": np.arange(n_train) % len(games),
              "holdout_images": holdout, "holdout_labels": np.arange(n_holdout) % len(games)}
    return write_snapshot(path, arrays, {"games": list(games)})


@pytest.fixture
def make_snapshot() -> Callable[..., Path]:
    """`write_tiny_snapshot`, for tests that need a snapshot of their own shape or content."""
    return write_tiny_snapshot


@pytest.fixture
def snapshot(tmp_path) -> Snapshot:
    """48 training and 16 holdout frames of noise, loaded."""
    return load_snapshot(write_tiny_snapshot(tmp_path / "snapshot"))


@pytest.fixture(scope="session")
def hub_weights() -> Path:
    """The converted InceptionV3 weights in the torch hub cache; the tests fail (not skip) without them."""
    from src.inception import hub_weights_path

    path = hub_weights_path()
    if not path.is_file():
        pytest.fail(f"InceptionV3 weights are missing at {path}: run `python -m src.inception_weights` "
                    "before the tests (CI does)")
    return path


# A tiny project folder and the real CLIs, for subprocess tests (bad inputs, tune workers) ----------

# Small enough that a tune trial or a training run costs seconds on 2 CPU cores.
TINY_PARAMS = {
    "collect": {"games": ["Breakout-v4"], "train_frames": 32, "holdout_frames": 12, "workers": 1, "shard_frames": 50},
    "model": {"latent_dim": 16, "gen_filters": 8, "disc_filters": 8, "palette_size": 0},
    "train": {"device": "cpu", "iterations": 4, "batch_size": 8, "log_every": 2, "checkpoint_every": 1000,
              "precision": "fp32", "fid_every": 0, "image_every": 1000, "ema_warmup": 0},
    "evaluate": {"num_samples": 16, "batch_size": 16, "device": "cpu", "kid_subset_size": 4},
    "tune": {"n_trials": 2, "iterations": 4, "report_every": 2, "fid_samples": 8, "pruner": "none"},
}


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
def tiny_project(tmp_path, shipped_params_text) -> Path:
    """A project folder: the shipped params.yaml with tiny values, and a tiny snapshot."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(shipped_params_text)
    edit_params(project / "params.yaml", {f"{s}.{k}": v for s, kv in TINY_PARAMS.items() for k, v in kv.items()})
    edit_params(project / "params.yaml", {"profiles": None})  # the cpu profile would scale the tiny run up
    write_tiny_snapshot(project / "data" / "snapshot", 32, 12, games=("Breakout-v4",))
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


@pytest.fixture(scope="session")
def forked_cli():
    """`forked_cli.run(stage, *args, cwd=, env=)`: `run_module`, forked from a warm process (tests/forked_cli.py)."""
    from tests.forked_cli import ForkedCLI

    runner = ForkedCLI(cli_env(REPO_ROOT))
    yield runner
    runner.close()


@pytest.fixture(scope="session")
def shipped_params_text() -> str:
    """params.yaml as committed (git HEAD), not the working copy, which `dvc exp run -S ...` rewrites."""
    try:
        return subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=REPO_ROOT, capture_output=True,
                              text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"the shipped params.yaml is read from git, which is not available here ({exc})")


# Real servers (MLflow tracking, WebDAV remote) shared by the team tests: one of each per session.
from tests.servers import dav_server, mlflow_server  # noqa: E402, F401
