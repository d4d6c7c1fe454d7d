"""The `evaluate` stage: metrics/eval.json, the grid, MLflow, and a clear error for every bad input.

Uses the real InceptionV3 weights from the torch hub cache (`python -m src.inception_weights`
puts them there; CI runs it before the tests) on a tiny snapshot and a tiny generator file in
the format `src.train` writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import src.evaluate as ev
import src.fid as fid
from src.atomic import file_sha256
from src.data import SnapshotError, load_snapshot
from src.params import REPO_ROOT, ParamsError, parse_params

TINY = {"seed": 0, "model": {"latent_dim": 16, "gen_filters": 8, "disc_filters": 8},
        "evaluate": {"num_samples": 10, "batch_size": 16, "kid_subset_size": 1000, "device": "cpu"}}


def tiny_params(**evaluate) -> dict:
    return {**TINY, "evaluate": {**TINY["evaluate"], **evaluate}}


def write_generator(models: Path, name: str = "generator.pt", seed: int = 0) -> Path:
    """A generator file exactly as `src.train` writes it."""
    from src.models import Generator, model_kwargs
    from src.training import generator_payload

    params = parse_params(TINY)
    torch.manual_seed(seed)
    state = Generator(**model_kwargs(params)["generator"]).state_dict()
    models.mkdir(parents=True, exist_ok=True)
    torch.save(generator_payload(state, params, step=100, kind=name.removesuffix(".pt")), models / name)
    return models / name


@pytest.fixture
def workdir(tmp_path, make_snapshot) -> Path:
    make_snapshot(tmp_path / "data" / "snapshot", 12, 10, games=("Breakout-v4",))
    write_generator(tmp_path / "models")
    return tmp_path


def run(workdir: Path, params: dict, **kwargs) -> dict:
    return ev.run_evaluation(
        parse_params(params), snapshot_dir=workdir / "data" / "snapshot", models_dir=workdir / "models",
        metrics_file=workdir / "metrics" / "eval.json", grid_file=workdir / "plots" / "eval" / "grid.png",
        train_fid_csv=workdir / "plots" / "train" / "fid.csv", cache_dir=workdir / ".cache" / "fid",
        progress=False, **kwargs,
    )


def test_pick_generator_prefers_best_then_ema_then_last(tmp_path):
    with pytest.raises(ev.EvaluateError, match="no generator in .*dvc repro train"):
        ev.pick_generator(tmp_path)
    for name, expected in (("generator.pt", "generator.pt"), ("generator_ema.pt", "generator_ema.pt"),
                           ("generator_best.pt", "generator_best.pt")):
        (tmp_path / name).write_bytes(b"")
        assert ev.pick_generator(tmp_path).name == expected


def test_best_training_fid_from_csv(tmp_path):
    assert ev.best_training_fid(tmp_path / "missing.csv") == {}
    csv_file = tmp_path / "fid.csv"
    csv_file.write_text("step,fid\n500,310.5\n1000,250.25\n1500,270.0\n2000,nan\n2500,")
    assert ev.best_training_fid(csv_file) == {"best_train_step": 1000, "best_train_fid": 250.25}


def test_evaluate_writes_metrics_and_grid(workdir, hub_weights):
    write_generator(workdir / "models", "generator_ema.pt", seed=1)
    (workdir / "plots" / "train").mkdir(parents=True)
    (workdir / "plots" / "train" / "fid.csv").write_text("step,fid\n100,300.0\n200,280.5\n")
    with pytest.warns(ev.SmallSampleWarning) as caught:
        metrics = run(workdir, tiny_params())
    messages = " ".join(str(w.message) for w in caught)
    assert "biased" in messages and "kid_subset_size" in messages

    written = json.loads((workdir / "metrics" / "eval.json").read_text())
    assert written == metrics
    assert written["generator_file"] == "generator_ema.pt"  # EMA preferred over the last generator
    assert written["num_generated"] == 10 and written["num_real"] == 10 and written["num_train_for_floor"] == 10
    assert written["biased_sample_size"] is True
    assert written["kid_subset_size"] == 10  # clamped from 1000 and recorded
    assert written["weights_sha256"] == file_sha256(hub_weights)
    assert written["snapshot_sha256"] == load_snapshot(workdir / "data" / "snapshot").sha256
    assert written["best_train_step"] == 200 and written["best_train_fid"] == 280.5
    for key in ("fid", "kid_mean", "kid_std", "fid_holdout_vs_train"):
        assert np.isfinite(written[key]), key
    assert written["fid"] > written["fid_holdout_vs_train"] > 0  # an untrained generator is far off the floor

    from torchvision.io import read_image

    grid = read_image(str(workdir / "plots" / "eval" / "grid.png"))
    assert grid.shape[0] == 3 and grid.shape[2] > 2 * grid.shape[1]  # generated | real, side by side


def test_missing_snapshot(workdir):
    with pytest.raises(SnapshotError, match="no snapshot"):
        run(workdir / "elsewhere", tiny_params())
    assert not (workdir / "elsewhere" / "metrics" / "eval.json").exists()


def test_missing_model(workdir):
    (workdir / "models" / "generator.pt").unlink()
    with pytest.raises(ev.EvaluateError, match="no generator"):
        run(workdir, tiny_params())
    assert not (workdir / "metrics" / "eval.json").exists()


def test_unreadable_model(workdir, hub_weights):
    (workdir / "models" / "generator.pt").write_bytes(b"half a checkpoint")
    with pytest.raises(ev.UserError, match="generator.pt is not"):
        run(workdir, tiny_params())
    assert not (workdir / "metrics" / "eval.json").exists()


def test_mismatched_image_shape(workdir, hub_weights, make_snapshot):
    make_snapshot(workdir / "data" / "snapshot", 12, 10, size=32)  # 32x32 frames, a 64x64 generator
    with pytest.raises(fid.FIDInputError, match=r"\(3, 64, 64\) but the real frames are \(3, 32, 32\)"):
        run(workdir, tiny_params())
    assert not (workdir / "metrics" / "eval.json").exists()


def test_missing_or_unreadable_weights(workdir):
    with pytest.raises(fid.InceptionWeightsError, match="evaluate.inception_weights = .*no such file"):
        run(workdir, tiny_params(inception_weights=str(workdir / "nope.pth")))
    junk = workdir / "junk.pth"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(fid.InceptionWeightsError, match="not readable as torch-fidelity InceptionV3 weights"):
        run(workdir, tiny_params(inception_weights=str(junk)))
    assert not (workdir / "metrics" / "eval.json").exists()


def test_too_few_samples(workdir, make_snapshot):
    with pytest.raises(ParamsError, match="evaluate.num_samples"):
        parse_params(tiny_params(num_samples=1))
    snapshot = load_snapshot(workdir / "data" / "snapshot")
    with pytest.raises(ev.EvaluateError, match="at least 2"):
        ev.check_sample_counts(1, snapshot)
    make_snapshot(workdir / "data" / "snapshot", 12, 1)
    with pytest.raises(ev.EvaluateError, match="holdout split has 1 frame.*collect.holdout_frames"):
        run(workdir, tiny_params())
    assert not (workdir / "metrics" / "eval.json").exists()


def _cli(cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["OMP_NUM_THREADS"] = "1"  # see one_thread() in conftest.py
    return subprocess.run([sys.executable, "-m", "src.evaluate"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_cli_reports_errors_without_traceback(tmp_path):
    done = _cli(tmp_path)  # no params.yaml, no snapshot, no model
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr


def test_cli_end_to_end_logs_into_the_training_run_and_reuses_the_cache(workdir, hub_weights, monkeypatch):
    import mlflow

    from src.tracking import setup

    (workdir / "params.yaml").write_text(yaml.safe_dump(tiny_params(num_samples=8, kid_subset_size=4)))
    monkeypatch.chdir(workdir)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    setup()  # the training run, as src.train would have left it
    with mlflow.start_run(run_name="train") as train_run:
        mlflow.log_param("model.latent_dim", 16)
    (workdir / "models" / "run.json").write_text(json.dumps({"mlflow_run_id": train_run.info.run_id}))

    first = _cli(workdir)
    assert first.returncode == 0, first.stderr
    metrics = json.loads((workdir / "metrics" / "eval.json").read_text())
    assert metrics["num_generated"] == 8 and metrics["generator_file"] == "generator.pt"
    assert (workdir / "plots" / "eval" / "grid.png").is_file()
    assert "Inception features (holdout)" in first.stderr  # the progress bar of the miss
    logged = mlflow.get_run(train_run.info.run_id).data
    assert logged.metrics["eval/fid"] == pytest.approx(metrics["fid"])
    assert logged.metrics["eval/kid_mean"] == pytest.approx(metrics["kid_mean"])
    assert logged.tags["eval.generator_file"] == "generator.pt"
    assert logged.params["model.latent_dim"] == "16"  # the same run as training

    (workdir / "models" / "run.json").write_text(json.dumps({"mlflow_run_id": "0123456789abcdef"}))
    second = _cli(workdir)
    assert second.returncode == 0, second.stderr
    assert "unknown" in second.stderr and "new run" in second.stderr
    assert "Inception features (holdout)" not in second.stderr  # cache hit: the real side is not recomputed
    assert "Inception features (train)" not in second.stderr
    assert "Inception features (generated)" in second.stderr
    assert json.loads((workdir / "metrics" / "eval.json").read_text())["fid"] == pytest.approx(metrics["fid"])
    runs = mlflow.search_runs(experiment_ids=[setup()], output_format="list")
    assert len(runs) == 2 and any("eval/fid" in r.data.metrics for r in runs if r.info.run_id != train_run.info.run_id)
