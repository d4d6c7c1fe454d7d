"""Where the stages read and write, relative to the repo root (dvc.yaml names the same paths)."""

from __future__ import annotations

from pathlib import Path

SPLITS = ("train", "holdout")  # the snapshot's splits, in the order seeds and files use them
SNAPSHOT_DIR = Path("data/snapshot")
MODELS_DIR = Path("models")
CHECKPOINT_DIR = Path("checkpoints/train")  # not a DVC output: DVC deletes outputs before a rerun
TRAIN_METRICS_FILE = Path("metrics/train.json")
TRAIN_PLOTS_DIR = Path("plots/train")
