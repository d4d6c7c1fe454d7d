"""Checkpoints (src/training/checkpoint.py): a SIGKILLed run resumes bit for bit, SIGTERM leaves a checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from tests.conftest import TINY_MODEL, TINY_TRAIN

REPO = Path(__file__).resolve().parents[1]


# Interruption and resume (subprocesses) -------------------------------------------------------

RUNNER = textwrap.dedent(
    """
    import json, logging, sys, time
    from pathlib import Path
    logging.basicConfig(level=logging.INFO)
    import torch
    torch.set_num_threads(1)
    from src.data import load_snapshot
    from src.params import parse_params
    from src.training import TrainingInterrupted, train_gan

    cfg = json.loads(sys.argv[1])
    def log_fn(step, metrics):
        Path(cfg["progress"]).write_text(str(step))
        time.sleep(cfg["sleep"])
    try:
        result = train_gan(parse_params(cfg["params"]), load_snapshot(Path(cfg["snapshot"])),
                           checkpoint_dir=Path(cfg["ckpt"]), log_fn=log_fn, progress=False)
    except TrainingInterrupted as exc:
        print(exc, file=sys.stderr)
        sys.exit(128 + exc.signum)
    torch.save({k: v for k, v in result.generator.state_dict().items()}, cfg["out"])
    """
)


def start_runner(tmp_path: Path, name: str, snapshot_path: Path, params: dict, sleep: float):
    cfg = {"params": params, "snapshot": str(snapshot_path), "ckpt": str(tmp_path / f"ckpt_{name}"),
           "progress": str(tmp_path / f"progress_{name}"), "out": str(tmp_path / f"{name}.pt"), "sleep": sleep}
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(cfg)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, cfg


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"runner ended early ({proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("runner made no progress")
        time.sleep(0.01)


def test_resume_after_sigkill_equals_an_uninterrupted_run(snapshot, tmp_path):
    params = {"seed": 3, "model": TINY_MODEL,
              "train": {**TINY_TRAIN, "iterations": 40, "log_every": 2, "checkpoint_every": 10, "ema_decay": 0.9,
                        "augment": "color,translation", "loss": "bce", "lr_decay": "linear"}}
    reference, ref_cfg = start_runner(tmp_path, "reference", snapshot.path, params, sleep=0.0)
    killed, cfg = start_runner(tmp_path, "killed", snapshot.path, params, sleep=0.05)
    ckpt = Path(cfg["ckpt"]) / "checkpoint.pt"
    progress = Path(cfg["progress"])
    wait_for(lambda: ckpt.exists() and progress.exists() and int(progress.read_text() or 0) >= 14, killed)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=30) == -signal.SIGKILL
    step_at_kill = torch.load(ckpt, weights_only=False)["step"]
    assert 10 <= step_at_kill < 40
    resumed, _ = start_runner(tmp_path, "killed", snapshot.path, params, sleep=0.0)
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert f"at iteration {step_at_kill}" in err
    _, ref_err = reference.communicate(timeout=120)
    assert reference.returncode == 0, ref_err
    a, b = torch.load(cfg["out"]), torch.load(ref_cfg["out"])
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit, BN statistics included


def test_sigterm_writes_a_checkpoint_and_exits(snapshot, tmp_path):
    train_params = {**TINY_TRAIN, "iterations": 10_000, "log_every": 2, "checkpoint_every": 5_000}
    params = {"model": TINY_MODEL, "train": train_params}
    proc, cfg = start_runner(tmp_path, "term", snapshot.path, params, sleep=0.05)
    progress = Path(cfg["progress"])
    wait_for(lambda: progress.exists() and int(progress.read_text() or 0) >= 4, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM" in err and "Rerun" in err
    ckpt = torch.load(Path(cfg["ckpt"]) / "checkpoint.pt", weights_only=False)
    assert 4 <= ckpt["step"] < 10_000 and ckpt["step"] % 5_000 != 0
