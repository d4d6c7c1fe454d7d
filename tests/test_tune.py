"""`python -m src.tune`: a study continues across reruns, failures are recorded, workers share
a storage, and `--apply` edits exactly the four tuned values in params.yaml.

Tiny model, tiny budget, real training and real FID (InceptionV3 weights from the hub cache).
"""

from __future__ import annotations

import difflib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

import src.fid as fid
import src.tune as tune
from src.data import write_snapshot
from src.params import REPO_ROOT, load_params

TINY = {
    "seed": 0,
    "model": {"latent_dim": 16, "gen_filters": 8, "disc_filters": 8},
    "train": {"device": "cpu", "batch_size": 8, "log_every": 5, "checkpoint_every": 1000, "precision": "fp32"},
    "evaluate": {"batch_size": 16, "device": "cpu"},
    "tune": {"n_trials": 3, "iterations": 6, "report_every": 3, "fid_samples": 8, "pruner": "median"},
}


@pytest.fixture
def workdir(tmp_path, monkeypatch, shipped_params_text) -> Path:
    if not fid.hub_weights_path().is_file():
        pytest.fail("InceptionV3 weights are missing: run `python -m src.inception_weights` first (CI does)")
    rng = np.random.default_rng(0)
    frames = lambda n: rng.integers(0, 256, (n, 3, 64, 64), dtype=np.uint8)  # noqa: E731
    write_snapshot(
        tmp_path / "data" / "snapshot",
        {"train_images": frames(32), "train_labels": np.zeros(32, np.uint8),
         "holdout_images": frames(12), "holdout_labels": np.zeros(12, np.uint8)},
        {"games": ["Breakout-v4"]},
    )
    # The shipped params.yaml (git HEAD) with tiny values patched in, so comments and layout are real.
    text = shipped_params_text
    (tmp_path / "params.yaml").write_text(text)
    raw = yaml.safe_load(text)
    for section, values in TINY.items():
        if isinstance(values, dict):
            raw[section].update(values)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def states(storage: str, name: str = "atari-gan") -> list[str]:
    study = optuna.load_study(study_name=name, storage=storage)
    return [t.state.name for t in study.trials]


def test_study_runs_three_trials_and_a_rerun_continues_to_six(workdir):
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    tune.main(["--params", "tiny.yaml", "--storage", storage])
    assert len(states(storage)) == 3
    assert (workdir / "tune" / "best_params.json").is_file()
    tune.main(["--params", "tiny.yaml", "--storage", storage])
    got = states(storage)
    assert len(got) == 6
    assert set(got) <= {"COMPLETE", "PRUNED"} and "COMPLETE" in got

    import mlflow

    runs = mlflow.search_runs(experiment_names=["atari-gan"], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 2 and len(trials) == 6
    assert {r.data.tags["state"] for r in trials} <= {"complete", "pruned"}
    assert any("train.lr_g" in r.data.params for r in trials)
    best_parent = [r for r in parents if "best_fid" in r.data.metrics]
    assert best_parent, "the parent run records the best trial"
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(parents[0].info.run_id, "optuna")]
    assert "optuna/optimization_history.png" in artifacts


def test_a_failing_trial_is_recorded_and_the_study_goes_on(workdir, monkeypatch):
    import src.train

    real_train = src.train.train_gan
    calls = {"n": 0}

    def fails_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise src.train.NonFiniteLossError("loss became non-finite at iteration 3")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(src.train, "train_gan", fails_once)
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    tune.main(["--params", "tiny.yaml", "--storage", storage, "--n-trials", "3"])
    got = states(storage)
    assert got.count("FAIL") == 1 and len(got) == 3
    assert got[0] != "FAIL" and got[2] != "FAIL"


def test_two_workers_share_one_storage(workdir):
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "src.tune", "--params", "tiny.yaml", "--storage", storage, "--n-trials", "2"]
    workers = [subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output
    got = states(storage)
    assert len(got) == 4 and "FAIL" not in got, outputs


def test_apply_edits_only_the_four_values(workdir):
    before = (workdir / "params.yaml").read_text()
    best = {"lr_g": 0.000123, "lr_d": 0.000456, "beta1": 0.25, "beta2": 0.95}
    tune.apply_best(workdir / "params.yaml", best)
    after = (workdir / "params.yaml").read_text()
    changed = [line for line in difflib.ndiff(before.splitlines(), after.splitlines()) if line[:2] in ("- ", "+ ")]
    assert len(changed) == 8, "\n".join(changed)
    assert {line.split(":")[0].strip("-+ ") for line in changed} == set(best)
    assert "# " in after and after.count("\n") == before.count("\n")
    train = load_params(workdir / "params.yaml").train
    assert (train.lr_g, train.lr_d, train.beta1, train.beta2) == (0.000123, 0.000456, 0.25, 0.95)


def test_bad_command_line_values_are_clear_errors(workdir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tune.parse_args(["--n-trials", "0"])
    assert exit_info.value.code == 2
    assert "--n-trials must be a positive integer" in capsys.readouterr().err
