"""Real servers for the team tests: an MLflow tracking server (basic auth) and a WebDAV DVC remote.

CI starts them (`.ci/run` runs `.ci/postgres`, `.ci/mlflow-server`, `.ci/dav-remote`) and exports
their addresses; under CI=true a missing one fails the tests. Elsewhere a test session starts its
own through the same scripts (the server's runs then live in SQLite unless ATARI_GAN_TEST_POSTGRES_URL
is set) and stops it at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from base64 import b64encode
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _exports(text: str) -> dict[str, str]:
    return dict(line.removeprefix("export ").split("=", 1) for line in text.splitlines() if line.startswith("export "))


def _server(script: str, prefix: str) -> Iterator[dict[str, str]]:
    """The values `<prefix>*` that CI exported, or those of a server started (and stopped) here."""
    names = {k: v for k, v in os.environ.items() if k.startswith(prefix)}
    if names.get(f"{prefix}URL"):
        yield names
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{prefix}URL is not set: .ci/run starts this server with `.ci/{script}`")
    started = subprocess.run(["bash", str(REPO / ".ci" / script)], capture_output=True, text=True, timeout=240,
                             env={**os.environ, "PYTHON": sys.executable})
    if started.returncode != 0:
        pytest.fail(f".ci/{script} failed: {started.stderr[-2000:]}")
    values = _exports(started.stdout)
    try:
        yield values
    finally:
        subprocess.run(["bash", str(REPO / ".ci" / script), "stop"], env={**os.environ, **values}, timeout=60)


@dataclass
class MlflowServer:
    url: str
    user: str
    password: str
    artifacts: Path

    def login(self, user: str | None = None, password: str | None = None) -> dict[str, str]:
        """Client environment for this server: the admin's login unless another is given."""
        return {"MLFLOW_TRACKING_URI": self.url, "MLFLOW_TRACKING_USERNAME": user or self.user,
                "MLFLOW_TRACKING_PASSWORD": password or self.password}

    def admin(self, method: str, endpoint: str, body: dict) -> int:
        """An admin call to the server's REST API (e.g. the auth app's users); the HTTP status."""
        token = b64encode(f"{self.user}:{self.password}".encode()).decode()
        request = urllib.request.Request(f"{self.url}{endpoint}", data=json.dumps(body).encode(), method=method,
                                         headers={"Authorization": f"Basic {token}",
                                                  "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status


@dataclass
class DavServer:
    url: str
    user: str
    password: str
    root: Path


@pytest.fixture(scope="session")
def mlflow_server() -> Iterator[MlflowServer]:
    """A real `mlflow server --app-name basic-auth` with --artifacts-destination, on loopback."""
    for v in _server("mlflow-server", "ATARI_GAN_TEST_MLFLOW_"):
        yield MlflowServer(v["ATARI_GAN_TEST_MLFLOW_URL"], v["ATARI_GAN_TEST_MLFLOW_USER"],
                           v["ATARI_GAN_TEST_MLFLOW_PASSWORD"], Path(v["ATARI_GAN_TEST_MLFLOW_ARTIFACTS"]))


@pytest.fixture(scope="session")
def dav_server() -> Iterator[DavServer]:
    """A real WebDAV server (wsgidav, basic auth) for a DVC remote, on loopback."""
    for v in _server("dav-remote", "ATARI_GAN_TEST_DAV_"):
        yield DavServer(v["ATARI_GAN_TEST_DAV_URL"], v["ATARI_GAN_TEST_DAV_USER"], v["ATARI_GAN_TEST_DAV_PASSWORD"],
                        Path(v["ATARI_GAN_TEST_DAV_ROOT"]))
