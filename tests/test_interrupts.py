"""Real signals to real stage processes: a killed collect leaves no process behind, an interrupted
tune keeps its finished trials and says how to go on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.conftest import cli_env, edit_params


def _holders_of(path: Path) -> list[int]:
    """PIDs of processes that have `path` open or mapped."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            fds = [os.readlink(f"/proc/{proc.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{proc.pid}/fd")]
            maps = Path(f"/proc/{proc.pid}/maps").read_text()
        except OSError:
            continue
        if str(path) in fds or str(path) in maps:
            found.append(proc.pid)
    return found


def test_a_sigkilled_collect_leaves_no_process_and_no_held_file(tiny_project):
    edit_params(tiny_project / "params.yaml", {"collect.workers": 2, "collect.train_frames": 40_000,
                                               "collect.holdout_frames": 2_000, "collect.shard_frames": 2_000})
    collect = subprocess.Popen([sys.executable, "-m", "src.collect"], cwd=tiny_project, env=cli_env(tiny_project),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        parent = psutil.Process(collect.pid)
        deadline = time.monotonic() + 120
        frames: list[Path] = []
        # Running workers: children of the forkserver (grandchildren of collect), and the frame file.
        while not (frames and len(parent.children(recursive=True)) >= 4):
            assert collect.poll() is None and time.monotonic() < deadline, "collect ended before it was killed"
            frames = list((tiny_project / "data").glob(".collect-*.frames"))
            time.sleep(0.2)
        family = parent.children(recursive=True)
        assert _holders_of(frames[0]), "the workers should hold the frame file while they play"
    finally:
        collect.send_signal(signal.SIGKILL)
        collect.wait(timeout=30)
    _, alive = psutil.wait_procs(family, timeout=20)
    for left in alive:  # a failing run must not leave them behind on a shared machine
        left.kill()
    assert not alive, f"left running after collect was killed: {[(p.pid, p.cmdline()[:3]) for p in alive]}"
    assert not _holders_of(frames[0]), "a process still holds the frame file"


def test_ctrl_c_during_tune_exits_130_keeps_finished_trials_and_says_how_to_continue(tiny_project, hub_weights):
    edit_params(tiny_project / "params.yaml", {"tune.iterations": 200, "tune.report_every": 100})
    storage = f"sqlite:///{tiny_project / 'optuna.db'}"
    tune = subprocess.Popen([sys.executable, "-m", "src.tune", "--storage", storage, "--n-trials", "3"],
                            cwd=tiny_project, env={**cli_env(tiny_project), "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in tune.stdout:  # the progress lines: wait for the first finished trial
            if line.startswith("trial 0: complete"):
                break
        else:
            raise AssertionError(f"trial 0 never completed: {tune.stderr.read()}")
        time.sleep(2)  # into trial 1's training
        tune.send_signal(signal.SIGINT)
        _, err = tune.communicate(timeout=120)
    finally:
        tune.kill()
    assert tune.returncode == 130, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "interrupted" in errors[0] and "python -m src.tune" in errors[0] and "optuna.db" in errors[0], errors[0]
    assert "checkpoint" not in errors[0], "no advice about a temporary checkpoint that no longer exists"

    import optuna

    trials = optuna.load_study(study_name="atari-gan", storage=storage).trials
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert [t.number for t in complete] == [0], [(t.number, t.state) for t in trials]
    best = json.loads((tiny_project / "tune" / "best_params.json").read_text())
    assert best["trial"] == 0 and best["fid"] == complete[0].value
