"""Two teammates, two fresh clones, one MLflow server and one DVC remote (docs/team.md), all real.

A tiny git + DVC project (this repo's dvc.yaml, src/ and .dvc/config, tiny params) is pushed to a
bare git origin. Teammate A clones it, runs `dvc repro` and a 2-worker `src.tune` against the
tracking server (tests/servers.py: basic auth, --artifacts-destination), commits and pushes git,
and `dvc push`es to a WebDAV remote whose login lives in .dvc/config.local. Teammate B clones,
sees A's runs and FID on the server, downloads A's generator and grid through it, `dvc pull`s and
finds nothing to reproduce. The server's artifact folder holds the artifacts; A's mlruns/ does not exist.
A params combination A pushed with DVC's run-cache reaches B without training.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import yaml

from tests.conftest import TINY_PARAMS, cli_env, edit_params
from tests.servers import DavServer, MlflowServer
from tests.test_tune_workers import POSTGRES_ENV

REPO = Path(__file__).resolve().parents[1]


def sh(*cmd: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} -> {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def git(*args: str, cwd: Path) -> str:
    return sh("git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args, cwd=cwd)


def make_origin(tmp_path: Path, shipped_params_text: str) -> Path:
    """A bare git origin holding a tiny copy of this project: dvc.yaml, src/, .dvc/config, tiny params."""
    seed = tmp_path / "seed"
    seed.mkdir()
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(REPO / name, seed / name)
    shutil.copytree(REPO / "src", seed / "src", ignore=shutil.ignore_patterns("__pycache__"))
    (seed / "params.yaml").write_text(shipped_params_text)
    edit_params(seed / "params.yaml", {f"{s}.{k}": v for s, kv in TINY_PARAMS.items() for k, v in kv.items()})
    # dvc.yaml tracks `profiles`: keep one, setting the tiny value (the shipped cpu profile would scale the run up)
    edit_params(seed / "params.yaml", {"profiles": {"cpu": {"train": {"iterations": 4}}}, "tune.n_trials": 1})
    git("init", "-q", "-b", "main", cwd=seed)
    sh("dvc", "init", "-q", cwd=seed)
    shutil.copy(REPO / ".dvc" / "config", seed / ".dvc" / "config")  # the repo's remote settings
    git("add", "-A", cwd=seed)
    git("commit", "-q", "-m", "tiny project", cwd=seed)
    origin = tmp_path / "origin.git"
    git("clone", "-q", "--bare", str(seed), str(origin), cwd=tmp_path)
    return origin


def teammate(origin: Path, folder: Path, dav: DavServer) -> Path:
    """A fresh clone whose DVC remote is the WebDAV server, its login in .dvc/config.local only."""
    git("clone", "-q", str(origin), str(folder), cwd=origin.parent)
    sh("dvc", "remote", "add", "--local", "-d", "team", dav.url, cwd=folder)
    sh("dvc", "remote", "modify", "--local", "team", "user", dav.user, cwd=folder)
    sh("dvc", "remote", "modify", "--local", "team", "password", dav.password, cwd=folder)
    return folder


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_teammates_share_runs_models_and_data(tmp_path, shipped_params_text, mlflow_server: MlflowServer,
                                                  dav_server: DavServer, hub_weights, monkeypatch, request):
    origin = make_origin(tmp_path, shipped_params_text)
    experiment = f"team-{uuid.uuid4().hex[:8]}"  # the server outlives the test
    times = {}

    # Teammate A: reproduce, tune with two workers, share.
    a = teammate(origin, tmp_path / "a", dav_server)
    env_a = {**cli_env(a), **mlflow_server.login(), "ATARI_GAN_EXPERIMENT": experiment}
    start = time.monotonic()
    sh("dvc", "repro", cwd=a, env=env_a, timeout=600)
    times["A: dvc repro from nothing"] = time.monotonic() - start
    storage = os.environ.get(POSTGRES_ENV) or f"sqlite:///{a / 'optuna.db'}"
    study = f"team-{uuid.uuid4().hex[:8]}"
    tune = [sys.executable, "-m", "src.tune", "--storage", storage, "--study-name", study]
    workers = [subprocess.Popen(tune, cwd=a, env=env_a, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(2)]
    for worker in workers:
        out = worker.communicate(timeout=600)[0]
        assert worker.returncode == 0, out[-3000:]
    times["A: 2-worker tune"] = time.monotonic() - start - times["A: dvc repro from nothing"]
    git("add", "-A", cwd=a)
    git("commit", "-q", "-m", "A's run", cwd=a)
    git("push", "-q", "origin", "main", cwd=a)
    sh("dvc", "push", "--run-cache", cwd=a)
    tracked = git("ls-files", cwd=a).split()
    assert "dvc.lock" in tracked and ".dvc/config.local" not in tracked
    assert not any(dav_server.password in (a / f).read_text(errors="ignore") for f in tracked if (a / f).is_file())
    assert not (a / "mlruns").exists(), "A's artifacts must go to the server, not A's mlruns/"

    # Teammate B: A's runs, FID, generator and grid through the server; the data and models through DVC.
    b = teammate(origin, tmp_path / "b", dav_server)
    import mlflow
    from mlflow import MlflowClient

    # B's own login (same user here) for this process's client, for this test only: a login left in the
    # environment would let later tests' "no login" clients in.
    for key, value in mlflow_server.login().items():
        monkeypatch.setenv(key, value)
    request.addfinalizer(functools.partial(mlflow.set_tracking_uri, mlflow.get_tracking_uri()))
    mlflow.set_tracking_uri(mlflow_server.url)
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    trained = [r for r in runs if "eval/fid" in r.data.metrics]
    assert len(trained) == 1, [r.data.tags.get("mlflow.runName") for r in runs]
    assert trained[0].data.metrics["eval/fid"] == yaml.safe_load((a / "metrics" / "eval.json").read_text())["fid"]
    trials = [r for r in runs if r.data.tags.get("optuna.study") == study and "mlflow.parentRunId" in r.data.tags]
    assert len(trials) == 2, "each worker's trial is a run on the server"
    run_id = trained[0].info.run_id
    grid = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="eval/grid.png", dst_path=str(b / "dl"))
    assert digest(Path(grid)) == digest(a / "plots" / "eval" / "grid.png")
    model = mlflow.pytorch.load_model(f"runs:/{run_id}/generator")
    assert sum(p.numel() for p in model.parameters()) > 0
    experiment_id = trained[0].info.experiment_id
    stored = mlflow_server.artifacts / experiment_id / run_id / "artifacts"
    assert (stored / "eval" / "grid.png").is_file()
    assert list((mlflow_server.artifacts / experiment_id).rglob("MLmodel")), "the generator model is on the server"

    assert [a.path for a in MlflowClient().list_artifacts(run_id)]  # listed through the server

    start = time.monotonic()
    sh("dvc", "pull", cwd=b, env=cli_env(b))
    times["B: dvc pull"] = time.monotonic() - start
    assert "up to date" in sh("dvc", "status", cwd=b, env=cli_env(b)).lower()
    repro = sh("dvc", "repro", cwd=b, env={**cli_env(b), **mlflow_server.login(), "ATARI_GAN_EXPERIMENT": experiment})
    assert "Running stage" not in repro, repro
    assert not (b / "checkpoints").exists(), "B trained"
    for path in sorted((a / "models").rglob("*")):
        if path.is_file():
            assert digest(path) == digest(b / path.relative_to(a)), path
    print("team timings (tiny params): " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))


def test_the_default_remote_is_a_folder_beside_the_clone(tmp_path):
    clone = tmp_path / "clone"
    clone.mkdir()
    git("init", "-q", cwd=clone)
    sh("dvc", "init", "-q", cwd=clone)
    shutil.copy(REPO / ".dvc" / "config", clone / ".dvc" / "config")
    (clone / "frames.bin").write_bytes(b"a snapshot")
    sh("dvc", "add", "-q", "frames.bin", cwd=clone)
    sh("dvc", "push", cwd=clone)
    pushed = [p for p in (tmp_path / "atari-gan-dvc-remote").rglob("*") if p.is_file()]
    assert [p.read_bytes() for p in pushed] == [b"a snapshot"]


def test_a_teammate_gets_a_pushed_experiment_from_the_run_cache_instead_of_training(tmp_path, shipped_params_text,
                                                                                     hub_weights):
    # DVC's run-cache (docs/team.md): A runs params someone else may run too and pushes it with --run-cache;
    # B, at the same commit with those params, gets A's outputs from the remote and trains nothing. Both use the
    # default remote, a folder beside the clones.
    origin = make_origin(tmp_path, shipped_params_text)
    other_params = {"profiles.cpu.train.iterations": 6}
    a = tmp_path / "a"
    git("clone", "-q", str(origin), str(a), cwd=tmp_path)
    sh("dvc", "repro", cwd=a, env=cli_env(a), timeout=600)
    git("add", "-A", cwd=a)
    git("commit", "-q", "-m", "A's run", cwd=a)
    git("push", "-q", "origin", "main", cwd=a)
    sh("dvc", "push", cwd=a)
    edit_params(a / "params.yaml", other_params)  # an experiment, not committed
    ran = sh("dvc", "repro", cwd=a, env=cli_env(a), timeout=600)
    assert "Running stage 'train'" in ran and "Running stage 'evaluate'" in ran, ran
    sh("dvc", "push", "--run-cache", cwd=a)

    b = tmp_path / "b"
    git("clone", "-q", str(origin), str(b), cwd=tmp_path)
    sh("dvc", "pull", "--run-cache", cwd=b, env=cli_env(b))
    edit_params(b / "params.yaml", other_params)
    restored = sh("dvc", "repro", "--pull", cwd=b, env=cli_env(b), timeout=600)
    assert "Running stage" not in restored, restored
    assert "Stage 'train' is cached" in restored and "Stage 'evaluate' is cached" in restored, restored
    assert not (b / "checkpoints").exists(), "B trained"
    for path in [p for out in ("models", "plots", "metrics") for p in sorted((a / out).rglob("*")) if p.is_file()]:
        assert digest(path) == digest(b / path.relative_to(a)), path
