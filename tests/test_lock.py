"""One writer per project: the lock refuses a second writer at once, names the holder, dies with it.

The holders are real processes (a small Python holding `src.lock.project_lock`, and real trainings),
and every refusal is checked against the kernel's lock, not a stand-in.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from src.lock import LOCK_FILE, ProjectLocked, project_lock
from tests.conftest import cli_env, edit_params, run_module

HOLD = ("import sys, time\nfrom src.lock import project_lock\n"
        "with project_lock(shared=sys.argv[1] == 'shared'):\n    print('held', flush=True)\n    time.sleep(600)\n")


def hold(folder: Path, mode: str = "exclusive", env: dict[str, str] | None = None) -> subprocess.Popen:
    """A process that holds `folder`'s lock until it is killed; returns once it holds it."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, mode], cwd=folder, env={**cli_env(folder), **(env or {})},
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def stop(process: subprocess.Popen) -> None:
    process.kill()
    process.wait(timeout=30)


def test_a_second_writer_is_refused_at_once_naming_the_holder_and_goes_ahead_after_a_sigkill(tmp_path):
    holder = hold(tmp_path)
    try:
        started = time.monotonic()
        with pytest.raises(ProjectLocked) as refused, project_lock(tmp_path):
            pass
        assert time.monotonic() - started < 1, "a held lock must be refused at once, not waited for"
        assert f"PID {holder.pid}: " in str(refused.value) and HOLD.splitlines()[0] in str(refused.value)
        with pytest.raises(ProjectLocked), project_lock(tmp_path, shared=True):
            pass  # an exclusive holder keeps shared ones out too
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up runs: the kernel releases the lock
        holder.wait(timeout=30)
    with project_lock(tmp_path) as path:
        assert path == tmp_path / LOCK_FILE
        assert path.read_text().startswith(f"PID {os.getpid()}: ")


def test_tune_workers_share_it_and_other_ranks_never_take_it(tmp_path):
    worker = hold(tmp_path, "shared")
    try:
        with project_lock(tmp_path, shared=True):  # a second tune worker on the same study
            pass
        with pytest.raises(ProjectLocked, match=f"PID {worker.pid}"), project_lock(tmp_path):
            pass
    finally:
        stop(worker)
    rank0 = hold(tmp_path)
    try:
        other_rank = hold(tmp_path, env={"RANK": "1"})  # torchrun's rank 1 of the holder's job
        stop(other_rank)
    finally:
        stop(rank0)


def test_two_trainings_in_one_project_the_second_refuses_at_once(tiny_project):
    edit_params(tiny_project / "params.yaml", {"train.iterations": 100_000, "train.checkpoint_every": 100_000})
    first = subprocess.Popen([sys.executable, "-m", "src.train"], cwd=tiny_project, env=cli_env(tiny_project),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lock = tiny_project / LOCK_FILE
        deadline = time.monotonic() + 120
        while not (lock.is_file() and f"PID {first.pid}" in lock.read_text()):
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the first training never took the lock"
            time.sleep(0.2)
        second = run_module("train", cwd=tiny_project, timeout=120)
        assert second.returncode == 2, second.stderr
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr
        assert f"PID {first.pid}: " in errors[0] and "-m src.train" in errors[0], errors[0]
        assert first.poll() is None, "the first training must go on"
        assert not (tiny_project / "models").exists(), "the refused training must not write outputs"
    finally:
        first.kill()
        first.wait(timeout=60)
