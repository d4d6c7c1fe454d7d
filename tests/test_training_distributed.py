"""DDP on CPU (src/training/distributed.py): two processes, their own batches, averaged gradients."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_MODEL, TINY_TRAIN

REPO = Path(__file__).resolve().parents[1]


# DDP on CPU --------------------------------------------------------------------------------

DDP_RUNNER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    import torch.distributed as dist
    from src.data import DeviceSampler, load_snapshot
    from src.params import parse_params
    from src.training import train_gan
    from src.training.distributed import init_distributed

    cfg = json.loads(sys.argv[1])
    rank, world = init_distributed("cpu")
    first = []
    sample = DeviceSampler.sample_labelled

    def recording(self, n):
        batch, labels = sample(self, n)
        if not first:
            first.append(batch.sum().item())
        return batch, labels

    DeviceSampler.sample_labelled = recording
    logs = []
    result = train_gan(parse_params(cfg["params"]), load_snapshot(Path(cfg["snapshot"])),
                       checkpoint_dir=Path(cfg["ckpt"]), log_fn=lambda s, m: logs.append(s), progress=False)
    torch.save({"state": result.generator.state_dict(), "first_batch": first[0], "world": result.world_size,
                "logs": logs, "iterations": result.iterations}, f"{cfg['out']}.{rank}")
    dist.destroy_process_group()
    """
)


# Lazy R1 adds a second backward through D (autograd.grad on its input) every r1_every steps.
@pytest.mark.parametrize("extra", [{}, {"r1_gamma": 1.0, "r1_every": 2}], ids=["plain", "lazy-r1"])
def test_ddp_on_cpu_with_two_processes(snapshot, tmp_path, extra):
    script = tmp_path / "ddp_runner.py"
    script.write_text(DDP_RUNNER)
    cfg = {"params": {"model": TINY_MODEL, "train": {**TINY_TRAIN, "iterations": 6, "log_every": 3,
                                                      "checkpoint_every": 3, "augment": "translation", **extra}},
           "snapshot": str(snapshot.path), "ckpt": str(tmp_path / "ckpt"), "out": str(tmp_path / "out")}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.Popen([*torchrun, str(script), json.dumps(cfg)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
        raise
    assert proc.returncode == 0, err[-3000:]
    r0, r1 = (torch.load(f"{cfg['out']}.{r}") for r in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["iterations"] == r1["iterations"] == 6
    assert r0["first_batch"] != r1["first_batch"]  # each process draws its own batches
    for key, value in r0["state"].items():
        if "running" not in key and "num_batches" not in key:  # BN statistics stay per process
            assert torch.equal(value, r1["state"][key]), key  # gradients were averaged: same weights
    assert r0["logs"] == [3, 6] and r1["logs"] == []  # only rank 0 reports
    ckpt = torch.load(tmp_path / "ckpt" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 6 and len(ckpt["rng"]) == 2
