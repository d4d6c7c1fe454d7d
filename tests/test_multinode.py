"""Training across machines: two `torchrun --nnodes 2` launches of the train stage, played on one box.

Each "node" is its own project folder (its own copy of params.yaml and the snapshot, as `dvc pull`
gives each machine), joined by c10d rendezvous over loopback with gloo (GLOO_SOCKET_IFNAME=lo).
`--local-addr` stands for each machine's host name, which orders the nodes: the first is global
rank 0 on every launch. Both launches are killed mid-run and started again: the run resumes from
rank 0's checkpoint (node 1 has none), finishes with the same weights on both ranks and one
MLflow run; only node 0 writes. A node with another snapshot stops both with one clear line.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import cli_env, edit_params, write_tiny_snapshot

# The train stage's own main, run by torchrun; each rank also saves its final generator weights to compare.
STAGE = textwrap.dedent(
    """
    import os, torch
    import src.train as stage
    from src.errors import run_cli

    train_gan = stage.train_gan

    def recording(*args, **kwargs):
        result = train_gan(*args, **kwargs)
        torch.save(result.generator.state_dict(), f"{os.environ['WEIGHTS']}.{os.environ['RANK']}")
        return result

    stage.train_gan = recording
    run_cli(stage.main)
    """
)
ADDRESSES = ("127.0.0.1", "127.0.0.2")  # one per node, like two host names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(node: Path, script: Path, port: int, address: str, weights: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "atari-gan",
           "--local-addr", address, str(script)]
    env = {**cli_env(node), "GLOO_SOCKET_IFNAME": "lo", "WEIGHTS": str(weights)}
    return subprocess.Popen(cmd, cwd=node, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str]]:
    try:
        errs = [p.communicate(timeout=timeout)[1] for p in procs]
        return [(p.returncode, err) for p, err in zip(procs, errs)]
    except subprocess.TimeoutExpired:
        kill(procs)
        raise


def kill(procs: list[subprocess.Popen]) -> None:
    """SIGKILL each launch and its workers (torchrun starts them in sessions of their own): the machines go away."""
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            for process in [*psutil.Process(p.pid).children(recursive=True), psutil.Process(p.pid)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
        p.wait(timeout=30)


@pytest.fixture
def nodes(tiny_project, tmp_path) -> tuple[Path, Path, Path]:
    edit_params(tiny_project / "params.yaml", {"train.iterations": 120, "train.log_every": 10,
                                               "train.checkpoint_every": 10})
    node1 = tmp_path / "node1"
    node1.mkdir()
    shutil.copy(tiny_project / "params.yaml", node1 / "params.yaml")
    shutil.copytree(tiny_project / "data", node1 / "data")
    script = tmp_path / "stage.py"
    script.write_text(STAGE)
    return tiny_project, node1, script


def test_two_nodes_train_resume_after_a_kill_and_agree(nodes, tmp_path):
    node0, node1, script = nodes
    weights = tmp_path / "weights"
    ckpt = node0 / "checkpoints" / "train" / "checkpoint.pt"
    port = free_port()
    procs = [launch(node, script, port, address, weights) for node, address in zip((node0, node1), ADDRESSES)]
    deadline = time.monotonic() + 180
    while not ckpt.exists():
        assert all(p.poll() is None for p in procs), finish(procs)
        assert time.monotonic() < deadline, "no checkpoint within 180 s"
        time.sleep(0.05)
    kill(procs)
    step_at_kill = torch.load(ckpt, weights_only=True)["step"]
    assert 10 <= step_at_kill < 120

    port = free_port()
    procs = [launch(node, script, port, address, weights) for node, address in zip((node0, node1), ADDRESSES)]
    (rc0, err0), (rc1, err1) = finish(procs)
    assert rc0 == 0 and rc1 == 0, err0[-3000:] + err1[-3000:]
    assert f"resuming from checkpoints/train/checkpoint.pt at iteration {step_at_kill}" in err0, err0[-3000:]

    w0, w1 = (torch.load(f"{weights}.{rank}") for rank in (0, 1))
    for key, value in w0.items():
        if "running" not in key and "num_batches" not in key:  # BN statistics stay per process
            assert torch.equal(value, w1[key]), key
    assert torch.load(ckpt, weights_only=True)["step"] == 120

    import mlflow

    mlflow.set_tracking_uri(cli_env(node0)["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["atari-gan"], output_format="list")
    assert len(runs) == 1, [r.info.run_id for r in runs]  # the restart continued the killed run
    assert runs[0].info.status == "FINISHED" and runs[0].data.tags["world_size"] == "2"
    assert (node0 / "models").is_dir() and (node0 / "metrics" / "train.json").is_file()
    written = {p.name for p in node1.iterdir()}
    assert written == {"params.yaml", "data"}, f"node 1 (not rank 0) wrote {written}"


def test_a_node_with_another_snapshot_stops_both(nodes, tmp_path):
    node0, node1, script = nodes
    shutil.rmtree(node1 / "data" / "snapshot")
    write_tiny_snapshot(node1 / "data" / "snapshot", 32, 12, seed=1, games=("Breakout-v4",))
    port = free_port()
    procs = [launch(node, script, port, address, tmp_path / "w") for node, address in zip((node0, node1), ADDRESSES)]
    results = finish(procs, timeout=180)
    for rc, err in results:
        assert rc != 0
        errors = [line for line in err.splitlines() if line.startswith("error: the snapshot in data/snapshot")]
        assert len(errors) == 1 and "`dvc pull` on each" in errors[0], err[-3000:]
    assert not (node0 / "models").exists() and not (node0 / "checkpoints").exists()
