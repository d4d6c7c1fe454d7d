"""Two `python -m src.tune` worker processes at once on one study, on SQLite and on PostgreSQL.

All trials are recorded, no two propose the same values, exactly one runs the params.yaml
baseline. PostgreSQL is a real server: `.ci/postgres` starts one and exports its URL in
ATARI_GAN_TEST_POSTGRES_URL (CI requires it; elsewhere the PostgreSQL case is skipped without it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import optuna
import pytest
import yaml

from tests.conftest import cli_env

POSTGRES_ENV = "ATARI_GAN_TEST_POSTGRES_URL"


def postgres_url() -> str:
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        message = f"{POSTGRES_ENV} is not set: start a server with `eval \"$(.ci/postgres)\"`"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)  # CI installs and starts one: a missing server is a broken CI
        pytest.skip(message)
    return url


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_workers_on_one_study_lose_nothing_and_repeat_nothing(tiny_project, backend, hub_weights):
    storage = f"sqlite:///{tiny_project / 'optuna.db'}" if backend == "sqlite" else postgres_url()
    study_name = f"workers-{uuid.uuid4().hex[:8]}"  # a shared server outlives the test
    cmd = [sys.executable, "-m", "src.tune", "--storage", storage, "--study-name", study_name, "--n-trials", "2"]
    workers = [subprocess.Popen(cmd, cwd=tiny_project, env=cli_env(tiny_project), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output

    from src.study import storage_url

    trials = optuna.load_study(study_name=study_name, storage=storage_url(storage)).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4, outputs  # nothing lost, nothing failed
    values = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(values)) == 4, f"duplicate parameter sets: {values}"
    baseline = [t for t in trials if t.user_attrs.get("baseline")]
    assert len(baseline) == 1, outputs
    shipped = yaml.safe_load((tiny_project / "params.yaml").read_text())["train"]
    assert baseline[0].params == {k: shipped[k] for k in ("lr_g", "lr_d", "beta1", "beta2")}
    everything = "".join(outputs)
    assert everything.count("created study") == 1 and "A new study created" not in everything, everything


def test_workers_opening_a_new_postgresql_database_at_once_all_get_it(tmp_path):
    # Optuna creates its schema on first use; on PostgreSQL racing creators collide on a duplicate type
    # ("pg_type_typname_nsp_index"), which must cost the loser a retry, not the run.
    import psycopg

    server = postgres_url().rsplit("/", 1)[0]
    for _ in range(3):
        name = f"race_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        code = f"from src.study import make_storage; make_storage({f'{server}/{name}'!r})"
        openers = [subprocess.Popen([sys.executable, "-c", code], env=cli_env(tmp_path), stderr=subprocess.PIPE,
                                    text=True) for _ in range(4)]
        for opener in openers:
            _, err = opener.communicate(timeout=120)
            assert opener.returncode == 0, err
