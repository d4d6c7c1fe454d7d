"""The pipeline under real DVC: a failing stage loses no output made before.

DVC deletes a stage's outputs before running its command, unless they are declared
`persist: true`; the stages replace their outputs atomically themselves, so nothing needs the
deletion and a params typo must not cost a snapshot that is in no DVC cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from tests.conftest import cli_env, edit_params

from src.params import REPO_ROOT


def dvc(*args: str, cwd, env) -> subprocess.CompletedProcess:
    exe = shutil.which("dvc", path=os.path.dirname(sys.executable)) or shutil.which("dvc")
    if exe is None:
        pytest.fail("dvc is not installed (it is a project dependency)")
    return subprocess.run([exe, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_failed_collect_keeps_the_snapshot_made_outside_dvc(tiny_project):
    project = tiny_project
    shutil.copy(REPO_ROOT / "dvc.yaml", project)
    shutil.copytree(REPO_ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**cli_env(project), "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(project)}  # the stage's `python -m src.collect` is the copy's
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    assert dvc("init", "-q", cwd=project, env=env).returncode == 0
    dvc("config", "core.analytics", "false", cwd=project, env=env)
    snapshot = {p.name: p.read_bytes() for p in (project / "data" / "snapshot").iterdir()}  # not in DVC's cache

    edit_params(project / "params.yaml", {"collect.games": ["Breakout"]})  # a typo: the stage fails
    done = dvc("repro", "collect", cwd=project, env=env)

    assert done.returncode != 0 and "unknown game 'Breakout'" in done.stdout + done.stderr, done.stdout + done.stderr
    kept = {p.name: p.read_bytes() for p in (project / "data" / "snapshot").iterdir()}
    assert kept == snapshot, "DVC deleted the snapshot before the failing stage"
