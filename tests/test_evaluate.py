"""The `evaluate` stage: metrics/eval.json, the grid, MLflow, and a clear error for every bad input.

Uses the real InceptionV3 weights from the torch hub cache (`python -m src.inception_weights`
puts them there; CI runs it before the tests) on a tiny snapshot and a tiny generator file in
the format `src.train` writes.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import src.evaluate as ev
import src.fid as fid
import src.inception as inception
import src.quality_metrics as quality_metrics
from src.data import SnapshotError, file_sha256, load_snapshot
from src.generator import GeneratorFileError, pick_generator
from src.params import REPO_ROOT, ParamsError, parse_params
from tests.conftest import write_tiny_snapshot

TINY = {"seed": 0, "model": {"latent_dim": 16, "gen_filters": 8, "disc_filters": 8},
        "evaluate": {"num_samples": 10, "batch_size": 16, "kid_subset_size": 1000, "device": "cpu"}}


def tiny_params(**evaluate) -> dict:
    return {**TINY, "evaluate": {**TINY["evaluate"], **evaluate}}


# 12 training and 10 holdout frames of noise, game Breakout (override any of these per call).
make_snapshot = functools.partial(write_tiny_snapshot, n_train=12, n_holdout=10, games=("Breakout-v4",))


def write_generator(models: Path, name: str = "generator.pt", seed: int = 0, palette_size: int = 16,
                    snapshot_dir: Path | None = None) -> Path:
    """A generator file exactly as `src.train` writes it; its palette set from the snapshot's training frames."""
    from src.models import Generator, model_kwargs, palette_of
    from src.training import generator_payload

    params = parse_params({**TINY, "model": {**TINY["model"], "palette_size": palette_size}})
    torch.manual_seed(seed)
    generator = Generator(**model_kwargs(params)["generator"])
    if palette_size:
        # As the trainer does; a palette left at zeros would draw every screen flat grey.
        train_images = load_snapshot(snapshot_dir, verify=False).train_images if snapshot_dir else None
        generator.palette.copy_(palette_of(train_images, palette_size) if train_images is not None
                                else torch.rand(palette_size, 3) * 2 - 1)
    with torch.no_grad():  # an untrained DCGAN draws ~0 everywhere (one colour): give it BN statistics, as
        for _ in range(60):  # training does, and a wider output layer, so its screens span the palette
            generator(torch.randn(16, params.model.latent_dim, 1, 1))
        generator.pipe[-2].weight.mul_(30)
    state = generator.state_dict()
    models.mkdir(parents=True, exist_ok=True)
    torch.save(generator_payload(state, params, step=100, kind=name.removesuffix(".pt")), models / name)
    return models / name


@pytest.fixture
def workdir(tmp_path) -> Path:
    make_snapshot(tmp_path / "data" / "snapshot")
    write_generator(tmp_path / "models")
    return tmp_path


@pytest.fixture(scope="module")
def atari_snapshot(tmp_path_factory) -> Path:
    """A real two-game snapshot from the collector (Breakout, Pong), small enough for CPU tests."""
    from src.collect import collect_snapshot
    from src.params import CollectParams, Params

    params = Params(seed=0, collect=CollectParams(games=["Breakout-v4", "Pong-v4"], train_frames=120,
                                                  holdout_frames=40, shard_frames=60))
    root = tmp_path_factory.mktemp("atari")
    (root / "cache").mkdir()
    return collect_snapshot(params, root / "snapshot", workers=1, progress=False)


@pytest.fixture
def atari_workdir(tmp_path, atari_snapshot, monkeypatch) -> Path:
    shutil.copytree(atari_snapshot, tmp_path / "data" / "snapshot")
    # One real-feature and classifier cache for all these tests (keyed by the same snapshot digest).
    (tmp_path / ".cache").symlink_to(atari_snapshot.parent / "cache", target_is_directory=True)
    write_generator(tmp_path / "models", snapshot_dir=atari_snapshot)
    monkeypatch.setattr(ev, "MIN_GAME_SAMPLES", 3)  # tiny sample counts: score every game with >= 3 screens
    return tmp_path


def run(workdir: Path, params: dict, cache: Path | None = None, **kwargs) -> dict:
    return ev.run_evaluation(
        parse_params(params), snapshot_dir=workdir / "data" / "snapshot", models_dir=workdir / "models",
        metrics_file=workdir / "metrics" / "eval.json", grid_file=workdir / "plots" / "eval" / "grid.png",
        train_fid_csv=workdir / "plots" / "train" / "fid.csv", cache_dir=cache or workdir / ".cache" / "fid",
        progress=False, **kwargs,
    )


def test_pick_generator_prefers_best_then_ema_then_last(tmp_path):
    with pytest.raises(GeneratorFileError, match="no generator in .*dvc repro train"):
        pick_generator(tmp_path)
    for name, expected in (("generator.pt", "generator.pt"), ("generator_ema.pt", "generator_ema.pt"),
                           ("generator_best.pt", "generator_best.pt")):
        (tmp_path / name).write_bytes(b"")
        assert pick_generator(tmp_path).name == expected


def test_best_training_fid_from_csv(tmp_path):
    assert ev.best_training_fid(tmp_path / "missing.csv") == {}
    csv_file = tmp_path / "fid.csv"
    csv_file.write_text("step,fid\n500,310.5\n1000,250.25\n1500,270.0\n2000,nan\n2500,")
    assert ev.best_training_fid(csv_file) == {"best_train_step": 1000, "best_train_fid": 250.25}


def test_each_games_floor_scores_that_games_training_frames_against_its_holdout_frames():
    generator = torch.Generator().manual_seed(0)
    holdout = torch.randn(40, 8, generator=generator, dtype=torch.float64)
    holdout_labels = np.repeat([0, 1], 20)
    train = torch.cat([holdout[:20], holdout[20:] + 3.0])  # game a: its holdout frames; game b: shifted by 3
    floors = ev.game_floors(["a", "b", "c"], holdout, holdout_labels, train, holdout_labels)
    assert floors["a"] == pytest.approx(0.0, abs=1e-6)
    assert floors["b"] == pytest.approx(8 * 3.0**2, rel=1e-6)  # equal covariances: the squared mean shift
    assert floors["c"] is None  # no frames of that game: no floor, not a number


def test_evaluate_writes_metrics_and_grid(atari_workdir, hub_weights):
    workdir = atari_workdir
    weights = hub_weights
    write_generator(workdir / "models", "generator_ema.pt", seed=1, snapshot_dir=workdir / "data" / "snapshot")
    (workdir / "plots" / "train").mkdir(parents=True)
    (workdir / "plots" / "train" / "fid.csv").write_text("step,fid\n100,300.0\n200,280.5\n")
    snapshot = load_snapshot(workdir / "data" / "snapshot")
    # The digest training recorded is this snapshot's: accepted.
    (workdir / "models" / "run.json").write_text(json.dumps({"snapshot_sha256": snapshot.sha256}))
    with pytest.warns(quality_metrics.SmallSampleWarning) as caught:
        metrics = run(workdir, tiny_params(num_samples=20))
    messages = " ".join(str(w.message) for w in caught)
    assert "biased" in messages and "kid_subset_size" in messages

    written = json.loads((workdir / "metrics" / "eval.json").read_text())
    assert written == metrics
    assert written["generator_file"] == "generator_ema.pt"  # EMA preferred over the last generator
    assert written["num_generated"] == 20 and written["num_real"] == 40 and written["num_train_for_floor"] == 20
    assert written["num_real_for_prc"] == 20
    assert written["biased_sample_size"] is True
    assert written["kid_subset_size"] == 20  # clamped from 1000 and recorded
    assert written["kid_std"] is None  # 20 of 20 generated: every subset is the whole sample
    assert written["weights_sha256"] == file_sha256(weights)
    assert written["snapshot_sha256"] == snapshot.sha256
    assert written["best_train_step"] == 200 and written["best_train_fid"] == 280.5
    for key in ("fid", "kid_mean", "fid_holdout_vs_train", "fid_raw", "fid_floor_palette"):
        assert np.isfinite(written[key]), key
    assert written["fid"] > written["fid_holdout_vs_train"] > 0  # an untrained generator is far off the floor
    # Shipped with its palette: fid is the palette drawing; the same latents raw score otherwise.
    assert written["post_processing"] == "palette16" and written["palette_size"] == 16
    assert written["fid_palette"] == written["fid"] != written["fid_raw"]
    assert written["fid_floor_palette"] != written["fid_holdout_vs_train"]
    for key in ("precision", "recall", "precision_raw", "recall_raw", "coverage", "coverage_raw",
                "precision_train_frames", "recall_train_frames", "coverage_train_frames"):
        assert 0 <= written[key] <= 1, key
    assert written["density"] >= 0 and written["density_train_frames"] > 0
    assert written["classifier_holdout_accuracy"] >= 0.99
    games = ["Breakout-v4", "Pong-v4"]
    for suffix in ("", "_raw"):
        shares = [written[f"coverage_share{suffix}/{g}"] for g in games]
        counts = [written[f"count_game{suffix}/{g}"] for g in games]
        assert sum(counts) == 20 and shares == pytest.approx([c / 20 for c in counts])
        assert written[f"coverage_tv{suffix}"] == pytest.approx(0.5 * sum(abs(x - 0.5) for x in shares))
        for game, count in zip(games, counts):
            scored = written[f"fid_game{suffix}/{game}"]
            assert (scored is None) == (count < 3) and (scored is None or np.isfinite(scored)), (game, suffix)
    assert [written[f"coverage_share_snapshot/{g}"] for g in games] == [0.5, 0.5]
    assert all(np.isfinite(written[f"fid_game_floor/{g}"]) for g in games)
    # Each game's palette floor is its snapped training frames': the like-for-like floor of its palette FID.
    assert all(np.isfinite(written[f"fid_game_floor_palette/{g}"]) and written[f"fid_game_floor_palette/{g}"]
               != written[f"fid_game_floor/{g}"] for g in games)

    from torchvision.io import read_image

    grid = read_image(str(workdir / "plots" / "eval" / "grid.png"))
    assert grid.shape[0] == 3 and grid.shape[2] > 2 * grid.shape[1]  # generated | real, side by side
    generated = grid[:, :, : grid.shape[1]]
    assert torch.unique(generated.reshape(3, -1), dim=1).shape[1] > 3  # several colours, not one flat grey


def test_raw_generator_is_also_scored_with_the_palette(atari_workdir, hub_weights):
    """The article recipe ships raw screens; evaluate also draws them with params.yaml's palette, like for like."""
    write_generator(atari_workdir / "models", palette_size=0)
    article = {**tiny_params(num_samples=20), "train": {"recipe": "article"}}  # model.palette_size stays 16
    with pytest.warns(quality_metrics.SmallSampleWarning):
        metrics = run(atari_workdir, article)
    assert metrics["post_processing"] == "none" and metrics["palette_size"] == 16
    assert metrics["fid_raw"] == metrics["fid"] != metrics["fid_palette"]
    assert "precision_palette" in metrics and "coverage_share_palette/Pong-v4" in metrics


def test_per_game_fid_warns_when_a_game_has_too_few_screens(atari_workdir, monkeypatch, hub_weights):
    monkeypatch.setattr(ev, "MIN_GAME_SAMPLES", 1000)
    with pytest.warns(quality_metrics.SmallSampleWarning, match="fewer than 1000: its per-game FID is not scored"):
        metrics = run(atari_workdir, tiny_params(num_samples=10))
    assert metrics["fid_game/Pong-v4"] is None and metrics["fid_game/Breakout-v4"] is None


def test_refuses_a_generator_trained_on_another_snapshot(atari_workdir):
    (atari_workdir / "models" / "run.json").write_text(json.dumps({"snapshot_sha256": "ab" * 32}))
    with pytest.raises(ev.EvaluateError, match=r"trained on snapshot abababababab.*dvc repro train"):
        run(atari_workdir, tiny_params())
    assert not (atari_workdir / "metrics" / "eval.json").exists()


def test_precision_and_recall_take_generated_then_real():
    """A collapsed generator (all screens near a few real ones) is precise but has low recall."""
    real = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    collapsed = real[:5].repeat(60, 1) + 1e-3 * torch.randn(300, 16, generator=torch.Generator().manual_seed(1))
    scores = quality_metrics.precision_recall(collapsed, real)
    assert scores["precision"] == 1.0 and scores["recall"] < 0.2
    assert quality_metrics.precision_recall(real, real) == {"precision": 1.0, "recall": 1.0}


def test_density_and_coverage_follow_naeem_et_al():
    """Each real sample's ball reaches its k-th nearest real neighbour; density counts balls, coverage balls hit."""
    real = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0], [12.0]])  # k = 1: every radius is 1.0
    fake = torch.tensor([[1.5], [1.5], [30.0]])
    # 1.5 lies strictly inside the balls of 1 and 2 (distance 0.5), none of 0 (1.5); 30 in none.
    scores = quality_metrics.density_coverage(fake, real, k=1)
    assert scores == {"density": pytest.approx(4 / (1 * 3)), "coverage": pytest.approx(2 / 6)}
    # A collapsed set crowds one region: high density, low coverage; the real set itself covers everything.
    cloud = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    collapsed = cloud[:3].repeat(100, 1)
    assert quality_metrics.density_coverage(collapsed, cloud)["coverage"] < 0.05
    assert quality_metrics.density_coverage(cloud, cloud)["coverage"] == 1.0
    scale = quality_metrics.real_scale(cloud[:150], cloud[150:])
    assert set(scale) == {f"{k}_train_frames" for k in ("precision", "recall", "density", "coverage")}


def test_evaluate_and_best_step_selection_draw_independent_latents(atari_snapshot, tmp_path, hub_weights):
    """The final FID is not scored on the noise that picked the best training step."""

    class Recorder(torch.nn.Module):
        num_classes = palette_size = 0

        def __init__(self):
            super().__init__()
            self.seen: list[torch.Tensor] = []

        def forward(self, z):
            self.seen.append(z.detach().cpu().clone())
            return z[:, :3].tanh().expand(-1, 3, 64, 64)

    snapshot = load_snapshot(atari_snapshot)
    params = parse_params({**tiny_params(num_samples=6), "train": {"fid_samples": 6}})
    selection = Recorder()
    fid_fn = fid.make_fid_fn(snapshot, params, "cpu", cache_dir=tmp_path / "fid")
    fid_fn(1, selection)
    fid_fn(2, selection)
    assert torch.equal(selection.seen[0], selection.seen[1])  # the same noise at every step
    final = Recorder()
    extractor = inception.InceptionFeatures(hub_weights, progress=False)
    with pytest.warns(quality_metrics.SmallSampleWarning):
        ev.evaluate_generator(final, snapshot, extractor, latent_dim=16, num_samples=6, kid_subset_size=6,
                              seed=params.seed, cache_dir=tmp_path / "fid", coverage_cache_dir=tmp_path / "cov")
    drawn = torch.cat(final.seen)
    assert drawn.shape == selection.seen[0].shape
    assert not torch.isclose(drawn, selection.seen[0]).any()  # no latent shared, not even a coordinate


@pytest.mark.parametrize("swap", [False, True])
def test_label_agreement_checks_each_screen_against_its_label(atari_snapshot, tmp_path, hub_weights, swap):
    """A conditional G that draws the game it is asked for agrees on every screen; one that draws the
    other game agrees on none, although both draw the same mix of games (so coverage_tv cannot tell)."""
    snapshot = load_snapshot(atari_snapshot)
    labels = np.asarray(snapshot.holdout_labels)
    frames = torch.stack([torch.from_numpy(snapshot.holdout_images[labels == g][0]) for g in (0, 1)])

    class Conditional(torch.nn.Module):
        num_classes, palette_size = 2, 0

        def __init__(self):
            super().__init__()
            self.register_buffer("class_freq", torch.tensor([0.5, 0.5]))

        def forward(self, z, asked):
            drawn = 1 - asked if swap else asked
            return frames[drawn.cpu()].float().div(127.5).sub(1).to(z.device)

    extractor = inception.InceptionFeatures(hub_weights, progress=False)
    with pytest.warns(quality_metrics.SmallSampleWarning):
        metrics, _ = ev.evaluate_generator(Conditional(), snapshot, extractor, latent_dim=4, num_samples=10,
                                           kid_subset_size=10, seed=0, cache_dir=tmp_path / "fid",
                                           coverage_cache_dir=tmp_path / "cov")
    assert metrics["label_agreement"] == (0.0 if swap else 1.0)
    assert metrics["coverage_tv"] == 0.0  # 5 screens of each game either way, as in the holdout


def test_missing_snapshot(workdir):
    with pytest.raises(SnapshotError, match="no snapshot"):
        run(workdir / "elsewhere", tiny_params())
    assert not (workdir / "elsewhere" / "metrics" / "eval.json").exists()


def test_missing_model(workdir):
    (workdir / "models" / "generator.pt").unlink()
    with pytest.raises(GeneratorFileError, match="no generator"):
        run(workdir, tiny_params())
    assert not (workdir / "metrics" / "eval.json").exists()


def test_unreadable_model(workdir, hub_weights):
    (workdir / "models" / "generator.pt").write_bytes(b"half a checkpoint")
    with pytest.raises(ev.UserError, match="generator.pt is not"):
        run(workdir, tiny_params())
    assert not (workdir / "metrics" / "eval.json").exists()


def test_mismatched_image_shape(workdir, hub_weights):
    make_snapshot(workdir / "data" / "snapshot", size=32)  # 32x32 frames, a 64x64 generator
    with pytest.raises(inception.FIDInputError, match=r"\(3, 64, 64\) but the real frames are \(3, 32, 32\)"):
        run(workdir, tiny_params())
    assert not (workdir / "metrics" / "eval.json").exists()


def test_missing_or_unreadable_weights(workdir):
    with pytest.raises(inception.InceptionWeightsError, match="evaluate.inception_weights = .*no such file"):
        run(workdir, tiny_params(inception_weights=str(workdir / "nope.pth")))
    junk = workdir / "junk.pth"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(inception.InceptionWeightsError, match="not readable as torch-fidelity InceptionV3 weights"):
        run(workdir, tiny_params(inception_weights=str(junk)))
    assert not (workdir / "metrics" / "eval.json").exists()


def test_too_few_samples(workdir):
    with pytest.raises(ParamsError, match="evaluate.num_samples"):
        parse_params(tiny_params(num_samples=1))
    snapshot = load_snapshot(workdir / "data" / "snapshot")
    with pytest.raises(ev.EvaluateError, match="at least 2"):
        ev.check_sample_counts(1, snapshot)
    make_snapshot(workdir / "data" / "snapshot", n_holdout=1)
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


def test_cli_end_to_end_logs_into_the_training_run_and_reuses_the_cache(workdir, monkeypatch, hub_weights):
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
    for key in ("fid_raw", "fid_floor_palette", "precision", "recall", "coverage_tv", "coverage_share/Breakout-v4",
                "fid_game_floor/Breakout-v4", "classifier_holdout_accuracy"):
        assert logged.metrics[f"eval/{key}"] == pytest.approx(metrics[key]), key
    assert metrics["fid_game/Breakout-v4"] is None and "eval/fid_game/Breakout-v4" not in logged.metrics  # 8 < 50
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


def test_holdout_subset_is_fixed_and_only_cuts_the_holdout(snapshot):
    # evaluate.holdout_samples (the cpu profile): the same holdout frames every run, training untouched.
    cut = ev.holdout_subset(snapshot, 5)
    again = ev.holdout_subset(snapshot, 5)
    assert len(cut.holdout_images) == len(cut.holdout_labels) == 5
    assert np.array_equal(cut.holdout_images, again.holdout_images)
    assert cut.train_images is snapshot.train_images and cut.sha256 == snapshot.sha256
    full = {bytes(f) for f in np.asarray(snapshot.holdout_images)}
    assert {bytes(f) for f in np.asarray(cut.holdout_images)} <= full
    assert ev.holdout_subset(snapshot, None) is snapshot
    assert ev.holdout_subset(snapshot, len(snapshot.holdout_images)) is snapshot
    with pytest.warns(UserWarning, match="holdout_samples = 100 is more than the snapshot's 16 holdout frames"):
        assert ev.holdout_subset(snapshot, 100) is snapshot  # more than there are: said, then all are scored


@pytest.mark.parametrize(("content", "why"), [(None, "is missing"), ("{not json", "is not readable JSON"),
                                               ("{}", "names no mlflow_run_id")])
def test_evaluation_without_a_training_run_says_why_and_logs_a_new_run(tmp_path, monkeypatch, content, why):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_file = tmp_path / "run.json"
    if content is not None:
        run_file.write_text(content)
    grid = tmp_path / "grid.png"
    Image.new("RGB", (4, 4)).save(grid)
    with pytest.warns(UserWarning, match=rf"no training run to log into \(.*run.json {why}\); logging the evaluation"):
        metrics = {"fid": 1.0, "generator_file": "g.pt", "weights_sha256": "w", "biased_sample_size": True}
        run_id = ev.log_to_mlflow(metrics, grid, run_file)
    assert run_id
