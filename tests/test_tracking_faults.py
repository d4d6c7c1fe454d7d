"""A tracking store that cannot be used, through the real CLIs: checked before any work, one clear line.

Each row runs `python -m src.<stage>` in a tiny project whose tracking store is broken (a corrupt
mlflow.db, a server that refuses connections or never answers, no or a wrong login on a basic-auth
server, an experiment whose artifacts live on one client's disk) and expects exit 2, one `error:`
line naming the store and the fix, no traceback, and no file changed or written but SQLite's lock.
The last test is the other side: a store that fails after the work costs a warning, not the work.
Servers are real (tests/servers.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import cli_env
from tests.servers import MlflowServer
from tests.test_bad_inputs import digests

TIMEOUT_ENV = "ATARI_GAN_TRACKING_TIMEOUT_S"
STAGES = ["train", "evaluate", "tune"]


def corrupt_db(project: Path, _server: Callable[[], MlflowServer]) -> dict[str, str]:
    (project / "mlflow.db").write_bytes(b"SQLite format 3\0" + os.urandom(4000))
    return {}


def closed_port(project: Path, _server: Callable[[], MlflowServer]) -> dict[str, str]:
    with socket.socket() as s:  # bound, then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A socket that accepts connections (the kernel's backlog) and never answers a request."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


def no_login(project: Path, server: Callable[[], MlflowServer]) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": server().url}


def wrong_password(project: Path, server: Callable[[], MlflowServer]) -> dict[str, str]:
    return server().login(password="not-the-password")


def local_artifact_experiment(project: Path, server: Callable[[], MlflowServer]) -> dict[str, str]:
    # What a client of the old code made: an experiment on the server whose artifacts go to its own disk.
    env = {**server().login(), "ATARI_GAN_EXPERIMENT": f"local-{uuid.uuid4().hex[:8]}"}
    code = ("import mlflow, sys; mlflow.create_experiment(sys.argv[1], "
            f"artifact_location={(project / 'mlruns').as_uri()!r})")
    subprocess.run([sys.executable, "-c", code, env["ATARI_GAN_EXPERIMENT"]], env={**os.environ, **env}, check=True,
                   timeout=60)
    return env


def bad_timeout(project: Path, _server: Callable[[], MlflowServer]) -> dict[str, str]:
    return {TIMEOUT_ENV: "soon"}


# (id, stage, store setup -> client env, expected substring of the one error line)
ROWS = [
    *[(f"corrupt-db-{s}", s, corrupt_db, "mlflow.db cannot be used") for s in STAGES],
    *[(f"refused-{s}", s, closed_port, "cannot reach the tracking server http://127.0.0.1:") for s in STAGES],
    ("no-login", "train", no_login, "asks for a login and none is set: set MLFLOW_TRACKING_USERNAME"),
    ("wrong-password", "evaluate", wrong_password, "refused the login of user 'admin'"),
    ("local-artifacts", "tune", local_artifact_experiment, "a folder on one machine that teammates and the server"),
    ("bad-timeout", "evaluate", bad_timeout, f"{TIMEOUT_ENV}='soon' is not a number of seconds"),
]


def run_stage(stage: str, project: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"src.{stage}"], cwd=project, env={**cli_env(project), **env},
                          capture_output=True, text=True, timeout=timeout)


def assert_one_error(done: subprocess.CompletedProcess, expected: str) -> None:
    assert done.returncode == 2, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and expected in errors[0], done.stderr


def assert_nothing_changed(project: Path, before: dict[str, str]) -> None:
    after = digests(project)
    changed = [path for path, digest in before.items() if after.get(path) != digest]
    assert not changed, f"files changed or removed: {changed}"
    assert set(after) - set(before) <= {"mlflow.db.lock"}, f"files written: {set(after) - set(before)}"


@pytest.mark.parametrize("name, stage, store, expected", ROWS, ids=[row[0] for row in ROWS])
def test_an_unusable_store_stops_the_stage_before_any_work(tiny_project, request, name, stage, store, expected):
    env = store(tiny_project, lambda: request.getfixturevalue("mlflow_server"))
    before = digests(tiny_project)
    done = run_stage(stage, tiny_project, env)
    assert_one_error(done, expected)
    assert_nothing_changed(tiny_project, before)


def test_a_server_that_never_answers_costs_seconds_not_minutes(tiny_project, silent_port):
    # MLflow's own defaults (7 retries, 120 s each) kept a stage waiting for minutes.
    before = digests(tiny_project)
    start = time.monotonic()
    done = run_stage("train", tiny_project, {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{silent_port}",
                                             TIMEOUT_ENV: "1"})
    assert_one_error(done, f"cannot reach the tracking server http://127.0.0.1:{silent_port} within 1 s")
    assert time.monotonic() - start < 60, "the store check is not bounded by its timeout"
    assert_nothing_changed(tiny_project, before)


def test_a_store_failing_after_the_work_costs_a_warning_not_the_work(tiny_project, mlflow_server):
    """A user logs a training to the server; their login is revoked while evaluate measures: evaluate's
    outputs are written, it exits 0 and says tracking failed and how to log again."""
    user, password = f"u{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    assert mlflow_server.admin("POST", "/api/2.0/mlflow/users/create", {"username": user, "password": password}) == 200
    env = {**mlflow_server.login(user, password), "ATARI_GAN_EXPERIMENT": f"after-{uuid.uuid4().hex[:8]}"}
    trained = run_stage("train", tiny_project, env)
    assert trained.returncode == 0, trained.stderr
    assert not (tiny_project / "mlruns").exists(), "a server's artifacts must not land in the client's mlruns/"

    evaluate = subprocess.Popen([sys.executable, "-m", "src.evaluate"], cwd=tiny_project,
                                env={**cli_env(tiny_project), **env}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    lines = []
    for line in evaluate.stderr:  # the store was checked; the measuring takes seconds from here
        lines.append(line)
        if line.startswith("tracking: "):
            break
    assert mlflow_server.admin("DELETE", "/api/2.0/mlflow/users/delete", {"username": user}) == 200
    out, err = evaluate.communicate(timeout=300)
    err = "".join(lines) + err
    assert evaluate.returncode == 0, err
    assert "Traceback" not in err + out, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: tracking to")]
    assert len(warnings) == 1 and "failed logging the evaluation" in warnings[0], err
    assert "run `python -m src.evaluate` again" in warnings[0]
    assert (tiny_project / "metrics" / "eval.json").is_file() and (tiny_project / "plots" / "eval" / "grid.png").is_file()
    assert "not logged to MLflow" in out
