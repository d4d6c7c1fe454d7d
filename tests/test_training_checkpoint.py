"""Checkpoints (src/training/checkpoint.py): a SIGKILLed run resumes bit for bit, SIGTERM leaves a checkpoint,
raised iterations continue exactly, other settings start over or are refused, a file that would run code is refused."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from src.atomic import file_sha256, load_torch_plain
from src.data import load_snapshot
from src.generator import GeneratorFileError, load_generator
from src.training import TrainingInterrupted, train_gan
from src.training.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    checkpoint_meta,
    global_rng_state,
    read_checkpoint,
    set_global_rng_state,
)
from tests.conftest import TINY_MODEL, TINY_TRAIN, tiny, write_tiny_snapshot

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


RESUMED_RECIPES = {  # what a resume must carry: augmentation and lr decay; R2, the gamma schedule, labels, the head
    "bce-augment-lrdecay": ({}, {"augment": "color,translation", "loss": "bce", "lr_decay": "linear"}),
    "cpu-profile-recipe": ({"conditional": True, "palette_size": 8, "palette_head": "soft"},
                           {"loss": "rpgan", "r1_gamma": 1.0, "r2_gamma": 1.0, "gamma_end_fraction": 0.1}),
}
TWO_GAMES = ["Breakout-v4", "Pong-v4"]


@pytest.mark.parametrize("recipe", sorted(RESUMED_RECIPES))
def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path, recipe):
    model, train = RESUMED_RECIPES[recipe]
    snapshot = load_snapshot(write_tiny_snapshot(tmp_path / "snapshot", games=tuple(TWO_GAMES)))
    params = {"seed": 3, "model": {**TINY_MODEL, **model}, "collect": {"games": TWO_GAMES},
              "train": {**TINY_TRAIN, "iterations": 40, "log_every": 2, "checkpoint_every": 10, "ema_decay": 0.9,
                        **train}}
    reference, ref_cfg = start_runner(tmp_path, "reference", snapshot.path, params, sleep=0.0)
    killed, cfg = start_runner(tmp_path, "killed", snapshot.path, params, sleep=0.05)
    ckpt = Path(cfg["ckpt"]) / "checkpoint.pt"
    progress = Path(cfg["progress"])
    wait_for(lambda: ckpt.exists() and progress.exists() and int(progress.read_text() or 0) >= 14, killed)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=30) == -signal.SIGKILL
    step_at_kill = torch.load(ckpt, weights_only=True)["step"]
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
    ckpt = torch.load(Path(cfg["ckpt"]) / "checkpoint.pt", weights_only=True)
    assert 4 <= ckpt["step"] < 10_000 and ckpt["step"] % 5_000 != 0


def test_a_signal_during_the_last_fid_still_stops_the_run_once_its_checkpoint_is_written(snapshot, tmp_path):
    # Ctrl-C while the final FID is measured (minutes at full size): the run ends as interrupted (exit 130; a tune
    # study stops too), not as if nothing had been pressed; its checkpoint holds every step, so a rerun finishes.
    def fid_fn(step, generator):
        if step == 8:
            os.kill(os.getpid(), signal.SIGINT)  # the stage's handler takes it: a flag, read after the FID
        return 100.0

    params = tiny(iterations=8, fid_every=4, fid_samples=8, checkpoint_every=4)
    with pytest.raises(TrainingInterrupted, match="interrupted by SIGINT at iteration 8"):
        train_gan(params, snapshot, checkpoint_dir=tmp_path, fid_fn=fid_fn, progress=False)
    ckpt = load_torch_plain(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == 8 and [row["step"] for row in ckpt["fid_history"]] == [4, 8]


def test_a_run_interrupted_between_log_steps_logs_the_same_losses_once_resumed(snapshot, tmp_path):
    # A signal stops the run at the next step (5), between log steps: its partial window of losses travels in the
    # checkpoint instead of becoming a row of its own, so the loss log equals an uninterrupted run's.
    params = tiny(iterations=12, log_every=4, checkpoint_every=100)

    def signal_at_4(step, metrics):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted, match="at iteration 5"):
        train_gan(params, snapshot, checkpoint_dir=tmp_path / "cut", log_fn=signal_at_4, progress=False)
    resumed = train_gan(params, snapshot, checkpoint_dir=tmp_path / "cut", progress=False)
    straight = train_gan(params, snapshot, checkpoint_dir=tmp_path / "straight", progress=False)
    assert [row["step"] for row in straight.loss_history] == [4, 8, 12]
    assert resumed.loss_history == straight.loss_history


# What a checkpoint resumes, refuses or ignores (in-process) ------------------------------------


def run_to(iterations: int, ckpt_dir: Path, snapshot, **train):
    result = train_gan(tiny(iterations=iterations, **train), snapshot, checkpoint_dir=ckpt_dir, progress=False)
    return result, load_torch_plain(ckpt_dir / "checkpoint.pt")


def assert_same_training(a: dict, b: dict) -> None:
    """Two checkpoints hold bit-equal models, optimisers, EMA, RNG streams and loss history."""
    assert a["step"] == b["step"] and a["loss_history"] == b["loss_history"]
    for key in ("model", "rng"):
        flat_a, flat_b = tree_leaves(a[key]), tree_leaves(b[key])
        assert len(flat_a) == len(flat_b) > 0
        for x, y in zip(flat_a, flat_b, strict=True):
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


def tree_leaves(tree):
    if isinstance(tree, dict):
        return [leaf for k in sorted(tree, key=str) for leaf in tree_leaves(tree[k])]
    if isinstance(tree, list | tuple):
        return [leaf for item in tree for leaf in tree_leaves(item)]
    return [tree]


def test_a_finished_run_resumed_at_its_end_reports_its_own_training_time(snapshot, tmp_path):
    _, ckpt = run_to(4, tmp_path, snapshot)
    again, _ = run_to(4, tmp_path, snapshot)  # trains nothing: metrics/train.json must not change
    assert again.iterations == 4 and again.elapsed_s == ckpt["elapsed_s"]


def test_raising_iterations_continues_bit_for_bit(snapshot, tmp_path, caplog):
    train = {"ema_decay": 0.9, "augment": "color,translation", "lr_decay": "none"}
    run_to(10, tmp_path / "grown", snapshot, **train)
    with caplog.at_level(logging.INFO, logger="src.training"):
        _, grown = run_to(20, tmp_path / "grown", snapshot, **train)
    assert "resuming from" in caplog.text and "at iteration 10" in caplog.text
    _, straight = run_to(20, tmp_path / "straight", snapshot, **train)
    assert_same_training(grown, straight)


def test_linear_decay_with_other_iterations_starts_over_instead_of_mixing_schedules(snapshot, tmp_path, caplog):
    run_to(10, tmp_path / "grown", snapshot, lr_decay="linear")
    with caplog.at_level(logging.INFO, logger="src.training"):
        _, grown = run_to(20, tmp_path / "grown", snapshot, lr_decay="linear")
    assert "ignoring checkpoint" in caplog.text and "resuming" not in caplog.text
    assert "train.iterations 10 -> 20, which the train.lr_decay: linear schedule ends at" in caplog.text
    _, straight = run_to(20, tmp_path / "straight", snapshot, lr_decay="linear")
    assert_same_training(grown, straight)


def test_the_stages_look_ahead_for_its_run_id_is_quiet_so_an_ignored_checkpoint_is_told_once(snapshot, tmp_path,
                                                                                              caplog):
    made_with = run_to(4, tmp_path, snapshot)[1]["settings"]
    other = {**made_with, "train": {**made_with["train"], "lr_d": 0.5}}
    with caplog.at_level(logging.INFO, logger="src.training"):
        assert checkpoint_meta(tmp_path, other, 10) == {}  # src.train asks first, for the MLflow run to resume
        assert read_checkpoint(tmp_path, other, 10) is None  # then train_gan reads it to train
    assert caplog.text.count("ignoring checkpoint") == 1, caplog.text


def test_a_gamma_schedule_with_other_iterations_starts_over_instead_of_mixing_schedules(snapshot, tmp_path, caplog):
    train = {"loss": "rpgan", "r1_gamma": 1.0, "r2_gamma": 1.0, "gamma_end_fraction": 0.1, "r1_every": 2}
    run_to(10, tmp_path / "grown", snapshot, **train)
    with caplog.at_level(logging.INFO, logger="src.training"):
        _, grown = run_to(20, tmp_path / "grown", snapshot, **train)
    assert "ignoring checkpoint" in caplog.text and "resuming" not in caplog.text
    assert "train.iterations 10 -> 20, which the train.gamma_end_fraction: 0.1 schedule ends at" in caplog.text
    _, straight = run_to(20, tmp_path / "straight", snapshot, **train)
    assert_same_training(grown, straight)


def test_a_checkpoint_beyond_the_asked_iterations_is_refused_and_left_alone(snapshot, tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    run_to(20, ckpt_dir, snapshot)
    before = file_sha256(ckpt_dir / "checkpoint.pt")
    with pytest.raises(CheckpointError) as err:
        train_gan(tiny(iterations=10), snapshot, checkpoint_dir=ckpt_dir, progress=False)
    message = str(err.value)
    assert "has already trained 20 iterations, more than train.iterations: 10" in message
    assert "Set train.iterations (or profiles.<profile>.train.iterations" in message
    assert "to 20 or more" in message and f"delete {ckpt_dir}/" in message
    assert file_sha256(ckpt_dir / "checkpoint.pt") == before
    assert train_gan(tiny(iterations=20), snapshot, checkpoint_dir=ckpt_dir, progress=False).iterations == 20


def test_fids_of_other_fid_settings_are_dropped_not_mixed(snapshot, tmp_path, caplog):
    def fid_fn(offset):
        return lambda step, gen: offset + step  # later steps score worse: the best stays the first measured

    ckpt_dir = tmp_path / "ckpt"
    train_gan(tiny(iterations=10, fid_every=5), snapshot, checkpoint_dir=ckpt_dir, fid_fn=fid_fn(0), progress=False)
    with caplog.at_level(logging.WARNING, logger="src.training"):
        other = train_gan(tiny(iterations=20, fid_every=5, fid_samples=200), snapshot, checkpoint_dir=ckpt_dir,
                          fid_fn=fid_fn(100), progress=False)
    assert "measured with other FID settings (train.fid_samples 500 -> 200)" in caplog.text
    assert [row["step"] for row in other.fid_history] == [15, 20]
    assert other.best_step == 15 and other.best_fid == 115


def test_equal_fid_settings_keep_the_best_across_a_resume(snapshot, tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    train_gan(tiny(iterations=10, fid_every=5), snapshot, checkpoint_dir=ckpt_dir, fid_fn=lambda s, g: s,
              progress=False)
    more = train_gan(tiny(iterations=20, fid_every=5), snapshot, checkpoint_dir=ckpt_dir, fid_fn=lambda s, g: s,
                     progress=False)
    assert [row["step"] for row in more.fid_history] == [5, 10, 15, 20] and more.best_step == 5


class RunsCode:
    """Unpickling this calls open(path, "w"): a harmless stand-in for any code a file could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_that_would_run_code_is_refused_unrun(snapshot, tmp_path):
    ckpt_dir, marker = tmp_path / "ckpt", tmp_path / "payload-ran"
    ckpt_dir.mkdir()
    torch.save({"format": CHECKPOINT_FORMAT, "step": 1, "payload": RunsCode(marker)}, ckpt_dir / "checkpoint.pt")
    before = file_sha256(ckpt_dir / "checkpoint.pt")
    with pytest.raises(CheckpointError) as err:
        train_gan(tiny(iterations=5), snapshot, checkpoint_dir=ckpt_dir, progress=False)
    assert not marker.exists()
    assert re.search(r"refusing to load .*objects other than tensors and plain data \(io.open\), which could run code.*"
                     r"delete .*ckpt/ \(or move it away\)", str(err.value))
    assert file_sha256(ckpt_dir / "checkpoint.pt") == before


def test_an_unreadable_checkpoint_is_refused_not_overwritten(snapshot, tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    (ckpt_dir / "checkpoint.pt").write_bytes(b"not a torch file")
    unreadable = r"refusing to load .*not a readable file of tensors and plain data \(Unsupported operand"
    with pytest.raises(CheckpointError, match=unreadable):
        train_gan(tiny(iterations=5), snapshot, checkpoint_dir=ckpt_dir, progress=False)
    assert (ckpt_dir / "checkpoint.pt").read_bytes() == b"not a torch file"


def test_a_generator_file_that_would_run_code_is_refused_unrun(tmp_path):
    path, marker = tmp_path / "generator.pt", tmp_path / "payload-ran"
    torch.save({"kind": "generator", "state_dict": {}, "payload": RunsCode(marker)}, path)
    with pytest.raises(GeneratorFileError) as err:
        load_generator(path)
    assert not marker.exists()
    assert "is not a readable generator file" in str(err.value)


def test_global_rng_states_survive_a_plain_data_round_trip(tmp_path):
    np.random.seed(5)
    random.seed(5)
    torch.manual_seed(5)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    torch.save(global_rng_state(), tmp_path / "rng.pt")
    expected = (np.random.standard_normal(3).tolist(), random.random(), torch.rand(2))
    set_global_rng_state(load_torch_plain(tmp_path / "rng.pt"))
    drawn = (np.random.standard_normal(3).tolist(), random.random(), torch.rand(2))
    assert drawn[:2] == expected[:2] and torch.equal(drawn[2], expected[2])
