"""Stage `train` (src/train.py): main wires params.yaml, the snapshot, outputs and the MLflow run."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

import src.train as train
from src.data import SnapshotError, load_snapshot
from src.params import Params
from tests.conftest import TINY_MODEL, TINY_TRAIN


def test_missing_snapshot_stops_main_before_training(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text(json.dumps({"model": TINY_MODEL, "train": TINY_TRAIN}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SnapshotError, match="no snapshot"):
        train.main([])
    assert not (tmp_path / "models").exists()


# The stage with MLflow --------------------------------------------------------------------


def test_main_tracks_the_run_in_mlflow(tmp_path, monkeypatch, make_snapshot):
    make_snapshot(tmp_path / "data" / "snapshot")
    params = {"collect": {"games": ["Pong-v4"]}, "model": TINY_MODEL, "train": {**TINY_TRAIN, "iterations": 6, "log_every": 2, "checkpoint_every": 3,
                                             "image_every": 3, "ema_decay": 0.9}}
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.setenv("DVC_EXP_NAME", "test-exp")
    train.main([])

    from mlflow.tracking import MlflowClient

    run_info = json.loads((tmp_path / "models" / "run.json").read_text())
    client = MlflowClient()
    run = client.get_run(run_info["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.experiment_id == run_info["mlflow_experiment_id"]
    assert run.data.params["train.lr_g"] == str(Params().train.lr_g) and run.data.params["model.gen_filters"] == "8"
    assert run.data.tags["recipe"] == "custom" and run.data.tags["dvc_exp_name"] == "test-exp"
    assert run.data.tags["snapshot_sha256"] == load_snapshot(tmp_path / "data" / "snapshot").sha256
    assert {"git_commit", "device"} <= set(run.data.tags)
    history = client.get_metric_history(run.info.run_id, "loss_g")
    # every log_every steps: the checkpoint at step 3 reads the losses, and they join step 4's window
    assert [m.step for m in history] == [2, 4, 6] and all(math.isfinite(m.value) for m in history)
    for key in ("loss_d", "d_real", "d_fake", "images_per_s"):
        assert client.get_metric_history(run.info.run_id, key)
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "images" in artifacts
    image_files = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    for key in ("real", "fake"):
        assert {f"images/{key}+step+{step}+" for step in (3, 6)} <= {p.split("timestamp")[0] for p in image_files}
    train_files = {a.path for a in client.list_artifacts(run.info.run_id, "train")}
    assert {"train/samples.png", "train/losses.csv"} <= train_files
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert any(m.source_run_id == run.info.run_id and m.name == "generator" for m in models)
    for name in ("generator.pt", "generator_ema.pt", "discriminator.pt"):
        assert (tmp_path / "models" / name).is_file()
    metrics = json.loads((tmp_path / "metrics" / "train.json").read_text())
    assert metrics["iterations"] == 6 and metrics["profile"] in ("cpu", "gpu")
    assert metrics["settings"]["image_every"] == 3 and metrics["settings"]["fid_every"] == 0
    assert {"data", "training", "checkpoints"} <= set(metrics["time_s"])  # written before "writing" ends
    assert run.data.tags["profile"] == metrics["profile"]
    for key in ("time_training_s", "time_writing_s"):
        assert client.get_metric_history(run.info.run_id, key)
    lines = (tmp_path / "plots" / "train" / "losses.csv").read_text().splitlines()
    assert lines[0] == "step,loss_g,loss_d,d_real,d_fake"
    assert [line.split(",")[0] for line in lines[1:]] == ["2", "4", "6"]

    check_through_mlflow_ui(tmp_path, run.info.run_id)


def check_through_mlflow_ui(workdir, run_id: str) -> None:
    """What a user sees: `mlflow ui` started in the folder, queried over its REST API."""
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"

    def get(path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=5).read()
                break
            except OSError:
                assert server.poll() is None, "mlflow ui exited"
                assert time.time() < deadline, "mlflow ui did not answer within 120 s"
                time.sleep(1)
        experiment = get("/api/2.0/mlflow/experiments/get-by-name?experiment_name=atari-gan")["experiment"]
        runs = get("/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
        run = next(r for r in runs if r["info"]["run_id"] == run_id)
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert params["train.lr_g"] == str(Params().train.lr_g) and params["train.recipe"] == "custom"
        assert {"loss_g", "loss_d", "d_real", "d_fake", "images_per_s"} <= {m["key"] for m in run["data"]["metrics"]}
        history = get(f"/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key=loss_g")["metrics"]
        assert [m["step"] for m in history] == [2, 4, 6]
        images = get(f"/api/2.0/mlflow/artifacts/list?run_id={run_id}&path=images")["files"]
        assert any(f["path"].startswith("images/fake+step+6+") for f in images)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
