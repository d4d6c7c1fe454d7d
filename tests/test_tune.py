"""`python -m src.tune`: a study continues across reruns, failures are recorded, workers share
a storage, and `--apply` edits exactly the four tuned values in params.yaml.

Tiny model, tiny budget, real training and real FID (InceptionV3 weights from the hub cache).
"""

from __future__ import annotations

import difflib
from pathlib import Path

import optuna
import pytest
import yaml

import src.tune as tune
from src.params import load_params, with_profile
from src.study import BASELINE_ATTR, baseline_values

TINY = {
    "seed": 0,
    "model": {"latent_dim": 16, "gen_filters": 8, "disc_filters": 8},
    "train": {"device": "cpu", "batch_size": 8, "log_every": 5, "checkpoint_every": 1000, "precision": "fp32"},
    "evaluate": {"batch_size": 16, "device": "cpu"},
    "tune": {"n_trials": 3, "iterations": 6, "report_every": 3, "fid_samples": 8, "pruner": "median"},
}


@pytest.fixture
def workdir(tmp_path, monkeypatch, make_snapshot, hub_weights, shipped_params_text) -> Path:
    make_snapshot(tmp_path / "data" / "snapshot", 32, 12, games=("Breakout-v4",))
    # The shipped params.yaml (git HEAD) with tiny values patched in as text, so comments and layout are real.
    text = shipped_params_text
    (tmp_path / "params.yaml").write_text(text)
    raw = yaml.safe_load(text)
    raw.pop("profiles", None)  # the cpu profile would scale the tiny trials up
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
    proposed = [tuple(sorted(t.params.items())) for t in optuna.load_study(study_name="atari-gan", storage=storage).trials]
    assert len(set(proposed)) == 6, f"the rerun repeated earlier trials: {proposed}"

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


def fail_on_call(monkeypatch, failing_call: int) -> None:
    """Make the `failing_call`-th training of the process raise NonFiniteLossError (as a diverged trial)."""
    import src.training

    real_train = src.training.train_gan
    calls = {"n": 0}

    def train(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == failing_call:
            raise src.training.NonFiniteLossError("loss became non-finite at iteration 3")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(src.training, "train_gan", train)


def test_a_failing_trial_is_recorded_and_the_study_goes_on(workdir, monkeypatch):
    fail_on_call(monkeypatch, 2)
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    tune.main(["--params", "tiny.yaml", "--storage", storage, "--n-trials", "3"])
    got = states(storage)
    assert got.count("FAIL") == 1 and len(got) == 3
    assert got[0] != "FAIL" and got[2] != "FAIL"


def changed_lines(before: str, after: str) -> list[str]:
    return [line for line in difflib.ndiff(before.splitlines(), after.splitlines()) if line[:2] in ("- ", "+ ")]


def test_apply_edits_only_the_four_values(workdir):
    before = (workdir / "tiny.yaml").read_text()
    best = {"lr_g": 0.000123, "lr_d": 0.000456, "beta1": 0.25, "beta2": 0.95}
    tune.apply_best(workdir / "tiny.yaml", best, tune.apply_section(load_params(workdir / "tiny.yaml")))
    after = (workdir / "tiny.yaml").read_text()
    changed = changed_lines(before, after)
    assert len(changed) == 8, "\n".join(changed)
    assert {line.split(":")[0].strip("-+ ") for line in changed} == set(best)
    train = load_params(workdir / "tiny.yaml").train
    assert (train.lr_g, train.lr_d, train.beta1, train.beta2) == (0.000123, 0.000456, 0.25, 0.95)


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_apply_writes_where_the_studys_profile_takes_them_and_nowhere_else(workdir, profile):
    # The shipped params.yaml, comments and all: its cpu profile sets lr_g, which would hide a top-level value.
    path = workdir / "params.yaml"
    before, shipped = path.read_text(), load_params(path)
    best = {"lr_g": 0.000123, "lr_d": 0.000456, "beta1": 0.25, "beta2": 0.95}
    ran_under = with_profile(shipped, profile)
    tune.apply_best(path, best, tune.apply_section(ran_under))
    after = load_params(path)
    got = with_profile(after, profile).train
    assert {key: getattr(got, key) for key in best} == best
    other = "gpu" if profile == "cpu" else "cpu"
    assert with_profile(after, other).model_dump(exclude={"profiles"}) == with_profile(shipped, other).model_dump(
        exclude={"profiles"}), f"the {other} profile changed too"
    assert after.train == shipped.train, "the top level changed"
    # One line: the profile's train mapping, edited (cpu) or added inside its block (gpu); nothing else moves.
    changed = changed_lines(before, path.read_text())
    assert [line[:2] for line in changed] == (["- ", "+ "] if profile == "cpu" else ["+ "]), changed
    assert changed[-1].startswith("+     train: {") and changed[-1].endswith("beta2: 0.95}"), changed
    lines = path.read_text().splitlines()
    after_it = lines[lines.index(changed[-1][2:]) + 1]
    assert after_it.startswith("    ") if profile == "cpu" else after_it == "", "the line left its profile's block"


def test_bad_command_line_values_are_clear_errors(workdir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tune.parse_args(["--n-trials", "0"])
    assert exit_info.value.code == 2
    assert "--n-trials must be a positive integer" in capsys.readouterr().err


def test_a_failed_baseline_is_run_again_and_apply_alone_runs_no_trial(workdir, monkeypatch, capsys):
    fail_on_call(monkeypatch, 1)
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    tune.main(["--params", "tiny.yaml", "--storage", storage, "--n-trials", "2"])
    study = optuna.load_study(study_name="atari-gan", storage=storage)
    baseline = [(t.number, t.state.name) for t in study.trials if t.user_attrs.get(BASELINE_ATTR)]
    assert baseline == [(0, "FAIL"), (1, "COMPLETE")]  # put back in the queue until it completes
    assert study.trials[1].params == baseline_values(load_params(workdir / "tiny.yaml"))
    out = capsys.readouterr().out
    assert out.count("created study") == 1 and "NonFiniteLossError" in out
    assert "continuing study" not in out, "a new study's queued baseline is not a trial so far"

    tune.main(["--params", "tiny.yaml", "--storage", storage, "--apply"])
    assert len(optuna.load_study(study_name="atari-gan", storage=storage).trials) == 2  # no new trial
    train = load_params(workdir / "tiny.yaml").train
    assert {k: getattr(train, k) for k in study.best_params} == {
        k: float(f"{v:.6g}") for k, v in study.best_params.items()}
