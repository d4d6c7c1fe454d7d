"""Set-up shared by every test module: one thread, tiny snapshots, the Inception weights, tiny params."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from src.data import Snapshot, load_snapshot, write_snapshot
from src.params import Params, parse_params

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
    """A snapshot of `n_train` + `n_holdout` frames labelled game 0: uniform noise, or `frames(n, seed, size)`."""
    if frames is None:
        rng = np.random.default_rng(seed)
        train = rng.integers(0, 256, (n_train, 3, size, size), dtype=np.uint8)
        holdout = rng.integers(0, 256, (n_holdout, 3, size, size), dtype=np.uint8)
    else:
        train, holdout = frames(n_train, seed, size), frames(n_holdout, seed + 1000, size)
    arrays = {"train_images": train, "train_labels": np.zeros(n_train, np.int64),
              "holdout_images": holdout, "holdout_labels": np.zeros(n_holdout, np.int64)}
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
    from src.fid import hub_weights_path

    path = hub_weights_path()
    if not path.is_file():
        pytest.fail(f"InceptionV3 weights are missing at {path}: run `python -m src.inception_weights` "
                    "before the tests (CI does)")
    return path
