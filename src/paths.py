"""Where the stages read and write, relative to the repo root (dvc.yaml names the same paths), and that root."""

from __future__ import annotations

import os
from pathlib import Path

SPLITS = ("train", "holdout")  # the snapshot's splits, in the order seeds and files use them
SNAPSHOT_DIR = Path("data/snapshot")
MODELS_DIR = Path("models")
CHECKPOINT_DIR = Path("checkpoints/train")  # not a DVC output: DVC deletes outputs before a rerun
COLLECT_METRICS_FILE = Path("metrics/collect.json")  # how the last collect went; not in the snapshot
TRAIN_METRICS_FILE = Path("metrics/train.json")
TRAIN_PLOTS_DIR = Path("plots/train")
# What the stages, DVC, git and MLflow write: no other command adds or replaces a file inside (DVC would find its
# outputs changed, or a stage's file would be lost).
STAGE_FOLDERS = (SNAPSHOT_DIR, MODELS_DIR, CHECKPOINT_DIR.parent, TRAIN_METRICS_FILE.parent, TRAIN_PLOTS_DIR.parent,
                 Path(".dvc"), Path(".git"), Path("mlruns"))


def repo_root() -> Path:
    """The project folder: DVC's root when a stage runs under DVC, else the working directory."""
    root = Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()
    parts = root.parts
    # A queued `dvc exp run` works in <repo>/.dvc/tmp/exps/<tmpdir>: results belong to <repo>.
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def stage_folder_holding(path: Path) -> Path | None:
    """The folder of STAGE_FOLDERS (under `repo_root()`) that `path` is or lies in, else None."""
    target, root = Path(path).resolve(), repo_root()
    for folder in STAGE_FOLDERS:
        owned = (root / folder).resolve()
        if target == owned or owned in target.parents:
            return folder
    return None
