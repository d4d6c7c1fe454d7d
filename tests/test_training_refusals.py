"""`python -m src.train` refuses, changing nothing, what would train silently wrong or run foreign code.

Each row of `REFUSALS` runs the real CLI in a copy of a project that has collected and trained
(20 iterations, a checkpoint, outputs, an MLflow run) and checks: exit status 2, one `error:`
message naming the problem and the fix, no traceback, every file of the project byte for byte as
before. The rows are meant for the bad-input table (tests/test_bad_inputs.py) when that exists.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from src.atomic import file_sha256
from src.collect import collect_snapshot
from src.data import collect_mismatches, load_snapshot
from src.lock import LOCK_FILE
from src.params import parse_params
from src.paths import CHECKPOINT_DIR, SNAPSHOT_DIR
from tests.conftest import TINY_MODEL, TINY_TRAIN

REPO = Path(__file__).resolve().parents[1]
COLLECT = {"games": ["Pong-v4"], "train_frames": 48, "holdout_frames": 16, "shard_frames": 40, "workers": 1}
PARAMS = {"seed": 0, "collect": COLLECT, "model": TINY_MODEL, "train": {**TINY_TRAIN, "device": "cpu"}}
FIX_COLLECT = ("`dvc repro collect`", "`python -m src.collect`")


def run_train(root: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "src.train"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)


def write_params(root: Path, params: dict) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A project folder after a real `src.collect` snapshot and a finished 20-iteration `src.train`."""
    root = tmp_path_factory.mktemp("trained")
    collect_snapshot(parse_params(PARAMS), root / SNAPSHOT_DIR, workers=1, progress=False)
    write_params(root, PARAMS)
    done = run_train(root)
    assert done.returncode == 0, done.stderr
    return root


def merged(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = merged(base[key], value) if isinstance(value, dict) else value
    return out


class RunsCode:
    """Unpickling this calls open(path, "w"): a harmless stand-in for any code a file could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def plant_code_in_checkpoint(root: Path) -> None:
    torch.save({"format": 2, "step": 20, "payload": RunsCode(root / "payload-ran")}, root / CHECKPOINT_DIR /
               "checkpoint.pt")


# (id, params.yaml update, set-up of the project, fragments the one message must hold)
REFUSALS = [
    ("collect-games-changed", {"collect": {"games": ["Pong-v4", "Breakout-v4"]}}, None,
     ["collect.games: ['Pong-v4'] in the snapshot, ['Pong-v4', 'Breakout-v4'] in params.yaml", *FIX_COLLECT]),
    ("collect-train-frames-changed", {"collect": {"train_frames": 60}}, None,
     ["collect.train_frames: 48 in the snapshot, 60 in params.yaml", *FIX_COLLECT]),
    ("collect-holdout-frames-changed", {"collect": {"holdout_frames": 20}}, None,
     ["collect.holdout_frames: 16 in the snapshot, 20 in params.yaml", *FIX_COLLECT]),
    ("collect-interpolation-changed", {"collect": {"interpolation": "area"}}, None,
     ["collect.interpolation: 'linear' in the snapshot, 'area' in params.yaml", *FIX_COLLECT]),
    ("collect-dedup-changed", {"collect": {"dedup": False}}, None,
     ["collect.dedup: True in the snapshot, False in params.yaml", *FIX_COLLECT]),
    ("seed-changed", {"seed": 1}, None, ["seed: 0 in the snapshot, 1 in params.yaml", *FIX_COLLECT]),
    ("iterations-below-the-checkpoint", {"train": {"iterations": 10}}, None,
     ["has already trained 20 iterations, more than train.iterations: 10", "nothing was changed",
      "Set train.iterations (or profiles.<profile>.train.iterations", "to 20 or more", "delete checkpoints/train/"]),
    ("checkpoint-that-would-run-code", {}, plant_code_in_checkpoint,
     ["refusing to load checkpoints/train/checkpoint.pt", "objects other than tensors and plain data (io.open)",
      "nothing was loaded or changed", "delete checkpoints/train/"]),
]


def project_files(root: Path) -> dict[str, str]:
    """Every file's digest, but the lock's: it names whoever held it last (the refused run too)."""
    return {str(p.relative_to(root)): file_sha256(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


@pytest.mark.parametrize(("update", "setup", "fragments"), [row[1:] for row in REFUSALS],
                         ids=[row[0] for row in REFUSALS])
def test_train_refuses_and_changes_nothing(trained, tmp_path, update, setup, fragments):
    root = tmp_path / "project"
    shutil.copytree(trained, root)
    write_params(root, merged(PARAMS, update))
    if setup is not None:
        setup(root)
    before = project_files(root)
    done = run_train(root)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "Traceback" not in output and output.count("error:") == 1, output
    message = next(line for line in done.stderr.splitlines() if line.startswith("error:"))
    for fragment in fragments:
        assert fragment in message, message
    assert project_files(root) == before
    assert not (root / "payload-ran").exists()


def test_only_settings_that_change_the_frames_are_compared(trained):
    manifest = load_snapshot(trained / SNAPSHOT_DIR).manifest
    assert collect_mismatches(parse_params(PARAMS), manifest) == []
    # The worker count does not change the frames (src.collect's tests show it): no refusal.
    assert collect_mismatches(parse_params(merged(PARAMS, {"collect": {"workers": 2}})), manifest) == []
    both = collect_mismatches(parse_params(merged(PARAMS, {"seed": 3, "collect": {"min_mean": 1.0}})), manifest)
    assert both == ["seed: 0 in the snapshot, 3 in params.yaml",
                    "collect.min_mean: 0.01 in the snapshot, 1.0 in params.yaml"]
    # A snapshot not written by src.collect records only its games: nothing else can be compared.
    assert collect_mismatches(parse_params(PARAMS), {"games": ["Pong-v4"]}) == []
    assert collect_mismatches(parse_params(PARAMS), {"games": ["Breakout-v4"]}) == [
        "collect.games: ['Breakout-v4'] in the snapshot, ['Pong-v4'] in params.yaml"]
