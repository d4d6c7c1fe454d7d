"""Set-up shared by every test module."""

from __future__ import annotations

import subprocess

import pytest
import torch

from src.params import REPO_ROOT


@pytest.fixture(autouse=True)
def one_thread():
    # On 2 shared cores a second OpenMP thread spin-waits against other jobs: measured here under
    # load, Inception ran 4.5 img/s with 1 thread vs 3.0 with 2, and a 2048-d FID took 4 s vs 10-25 s.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def shipped_params_text() -> str:
    """params.yaml as committed (git HEAD), not the working copy, which `dvc exp run -S ...` rewrites."""
    try:
        return subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=REPO_ROOT, capture_output=True,
                              text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"the shipped params.yaml is read from git, which is not available here ({exc})")
