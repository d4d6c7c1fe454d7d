"""The training stage: losses, EMA, each option, detach, checkpoints/resume, failures, DDP, MLflow."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import src.train as train
from src.data import DeviceSampler, SnapshotError, load_snapshot, write_snapshot
from src.models import Discriminator
from src.params import Params, effective, parse_params
from src.train import (
    EMA,
    DeviceError,
    GANTrainer,
    NonFiniteLossError,
    discriminator_loss,
    generator_loss,
    gradient_penalty,
    lr_scale,
    resolve_device,
    train_gan,
    write_outputs,
)

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {"latent_dim": 16, "gen_filters": 8, "disc_filters": 8}
TINY_TRAIN = {"batch_size": 8, "iterations": 20, "log_every": 5, "checkpoint_every": 10, "precision": "fp32",
              "ema_warmup": 5, "image_every": 1000, "fid_every": 0}


def tiny(**train_overrides):
    return parse_params({"model": TINY_MODEL, "train": {**TINY_TRAIN, **train_overrides}})


def make_snapshot(path: Path, frames: int = 48, shape=(3, 64, 64), seed: int = 0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (frames, *shape), dtype=np.uint8),
        "train_labels": np.zeros(frames, np.int64),
        "holdout_images": rng.integers(0, 256, (16, *shape), dtype=np.uint8),
        "holdout_labels": np.zeros(16, np.int64),
    }
    write_snapshot(path, arrays, {"games": ["Pong-v4"]})
    return load_snapshot(path)


@pytest.fixture
def snapshot(tmp_path):
    return make_snapshot(tmp_path / "snapshot")


def trainer_for(params, frames: int = 32) -> GANTrainer:
    images = np.random.default_rng(1).integers(0, 256, (frames, 3, 64, 64), dtype=np.uint8)
    precision = torch.bfloat16 if params.train.precision == "bf16" else None
    return GANTrainer(effective(params), images, torch.device("cpu"), precision=precision)


# Losses and EMA -----------------------------------------------------------------------------


def test_bce_losses_equal_the_articles_sigmoid_plus_bceloss():
    real, fake = torch.randn(32) * 3, torch.randn(32) * 3
    bce = nn.BCELoss()
    article_d = bce(torch.sigmoid(real), torch.ones(32)) + bce(torch.sigmoid(fake), torch.zeros(32))
    torch.testing.assert_close(discriminator_loss("bce", real, fake), article_d)
    torch.testing.assert_close(generator_loss("bce", fake), bce(torch.sigmoid(fake), torch.ones(32)))


def test_hinge_and_wasserstein_losses():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert discriminator_loss("hinge", real, fake).item() == pytest.approx((0 + 0.5) / 2 + (0 + 1) / 2)
    assert generator_loss("hinge", fake).item() == pytest.approx(1.0)
    assert discriminator_loss("wgan-gp", real, fake).item() == pytest.approx(-1.0 - 1.25)
    assert generator_loss("wgan-gp", fake).item() == pytest.approx(1.0)


def test_gradient_penalty_of_a_linear_critic():
    w = torch.randn(3, 4, 4)

    def critic(x):
        return (x * w).flatten(1).sum(1)

    gp = gradient_penalty(critic, torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4), torch.Generator().manual_seed(0))
    assert gp.item() == pytest.approx((w.norm().item() - 1) ** 2, rel=1e-5)


def test_ema_maths_with_warmup_and_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.9, warmup=4)
    assert [ema.decay_at(u) for u in (1, 2, 4, 100)] == pytest.approx([0.225, 0.45, 0.9, 0.9])
    assert EMA(model, decay=0.9, warmup=0).decay_at(1) == 0.9
    before = [p.clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model(torch.randn(8, 3))  # moves BN running statistics
    ema.update(model, 2)
    for old, new, avg in zip(before, model.parameters(), ema.model.parameters(), strict=True):
        torch.testing.assert_close(avg, 0.45 * old + 0.55 * new)
    for b_ema, b in zip(ema.model.buffers(), model.buffers(), strict=True):
        assert torch.equal(b_ema, b)
    assert not any(p.requires_grad for p in ema.model.parameters())


# Detach correctness -------------------------------------------------------------------------


def test_d_step_does_not_touch_g_and_g_step_does_not_update_d():
    trainer = trainer_for(tiny())
    trainer.step()  # leave G grads from a G step behind, as in a running loop
    trainer.opt_g.zero_grad(set_to_none=True)
    seen = {}
    d_step, g_step = trainer.opt_d.step, trainer.opt_g.step

    def spy_d_step(*args, **kwargs):
        seen["g_grads_at_d_step"] = [p.grad for p in trainer.G.parameters()]
        out = d_step(*args, **kwargs)
        seen["d_after_d_step"] = [p.detach().clone() for p in trainer.D.parameters()]
        seen["d_grads_after_d_step"] = [p.grad.clone() for p in trainer.D.parameters()]
        return out

    def spy_g_step(*args, **kwargs):
        seen["d_grads_at_g_step"] = [p.grad.clone() for p in trainer.D.parameters()]
        seen["g_grads_at_g_step"] = [p.grad for p in trainer.G.parameters()]
        return g_step(*args, **kwargs)

    trainer.opt_d.step, trainer.opt_g.step = spy_d_step, spy_g_step
    trainer.step()
    assert all(g is None for g in seen["g_grads_at_d_step"])  # D's loss sent no gradient into G
    assert all(g is not None and g.abs().sum() > 0 for g in seen["g_grads_at_g_step"])
    for before, at_g in zip(seen["d_grads_after_d_step"], seen["d_grads_at_g_step"], strict=True):
        assert torch.equal(before, at_g)  # the G step added no gradient to D
    for after_d, now in zip(seen["d_after_d_step"], trainer.D.parameters(), strict=True):
        assert torch.equal(after_d, now)  # and did not change D's weights
    assert all(p.requires_grad for p in trainer.D.parameters())


# The article preset and each option ----------------------------------------------------------


def test_article_preset_in_the_trainer():
    params = effective(tiny(recipe="article", batch_size=3, lr_g=0.3, loss="hinge", ema_decay=0.5, augment="color"))
    trainer = trainer_for(params)
    for opt in (trainer.opt_g, trainer.opt_d):
        group = opt.param_groups[0]
        assert group["lr"] == 1e-4 and group["betas"] == (0.5, 0.999)
    assert trainer.ema is None and trainer.policy == () and trainer.t.loss == "bce"
    batches = []
    sample = trainer.sampler.sample_labelled
    trainer.sampler.sample_labelled = lambda n: batches.append(n) or sample(n)
    trainer.step()
    assert batches == [16]


def test_d_steps_updates_d_more_often():
    trainer = trainer_for(tiny(d_steps=3))
    for _ in range(2):
        trainer.step()
    g_steps = trainer.opt_g.state[trainer.opt_g.param_groups[0]["params"][0]]["step"]
    d_steps = trainer.opt_d.state[trainer.opt_d.param_groups[0]["params"][0]]["step"]
    assert (int(g_steps), int(d_steps)) == (2, 6)


@pytest.mark.parametrize("loss", ["hinge", "wgan-gp"])
def test_other_losses_train_and_use_their_terms(loss, monkeypatch):
    calls = []
    real_gp = train.gradient_penalty
    monkeypatch.setattr(train, "gradient_penalty", lambda *a, **k: calls.append(1) or real_gp(*a, **k))
    trainer = trainer_for(tiny(loss=loss))
    before = [p.detach().clone() for p in trainer.G.parameters()]
    rows = torch.stack([trainer.step() for _ in range(2)])
    assert torch.isfinite(rows).all()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.G.parameters(), strict=True))
    assert len(calls) == (2 if loss == "wgan-gp" else 0)


def test_ema_option_tracks_g_and_is_the_eval_generator():
    trainer = trainer_for(tiny(ema_decay=0.5, ema_warmup=0))
    start = [p.detach().clone() for p in trainer.ema.model.parameters()]
    for _ in range(3):
        trainer.step()
    ema_params, g_params = list(trainer.ema.model.parameters()), list(trainer.G.parameters())
    assert trainer.eval_generator is trainer.ema.model
    assert any(not torch.equal(a, b) for a, b in zip(ema_params, start, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(ema_params, g_params, strict=True))
    assert trainer_for(tiny(ema_decay=0.0)).ema is None


def test_augment_option_augments_real_and_fake_in_both_steps(monkeypatch):
    calls = []
    real_aug = train.diff_augment

    def spy(x, policy, gen):
        calls.append((x.requires_grad, policy))
        return real_aug(x, policy, gen)

    monkeypatch.setattr(train, "diff_augment", spy)
    trainer = trainer_for(tiny(augment="color,translation,cutout"))
    assert torch.isfinite(trainer.step()).all()
    policy = ("color", "translation", "cutout")
    # D step: real, detached fake; G step: fake with its graph to G.
    assert calls == [(False, policy), (False, policy), (True, policy)]


def test_bf16_and_channels_last_options():
    trainer = trainer_for(tiny(precision="bf16", channels_last=True))
    dtypes = []
    trainer.D.pipe[0].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    assert torch.isfinite(trainer.step()).all()
    assert dtypes and set(dtypes) == {torch.bfloat16}
    conv = trainer.G.pipe[3].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert trainer_for(tiny(channels_last=False)).G.pipe[3].weight.is_contiguous()


def test_lr_scale_is_linear_in_steps_or_time_whichever_ends_first():
    assert lr_scale(0, 100, 0.0, None) == 1.0
    assert lr_scale(25, 100, 0.0, None) == 0.75
    assert lr_scale(25, 100, 30.0, 60.0) == 0.5  # half the time budget spent, a quarter of the steps
    assert lr_scale(80, 100, 30.0, 60.0) == pytest.approx(0.2)
    assert lr_scale(100, 100, 99.0, 60.0) == 0.0


def test_lr_decay_option_lowers_both_learning_rates(snapshot):
    trainer = trainer_for(tiny(lr_g=2e-3, lr_d=4e-3))
    trainer.set_lr_scale(0.25)
    assert trainer.opt_g.param_groups[0]["lr"] == pytest.approx(5e-4)
    assert trainer.opt_d.param_groups[0]["lr"] == pytest.approx(1e-3)

    def weights(iterations, lr_decay):
        params = tiny(iterations=iterations, lr_decay=lr_decay)
        return list(train_gan(params, snapshot, checkpoint_dir=None, progress=False).generator.state_dict().values())

    # The first step runs at the full rate; the later ones are smaller than without the decay.
    first = [weights(1, decay) for decay in ("none", "linear")]
    assert all(torch.equal(a, b) for a, b in zip(*first, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(weights(4, "none"), weights(4, "linear"), strict=True))


def test_palette_option_takes_the_training_frames_colours():
    params = parse_params({"model": {**TINY_MODEL, "palette_size": 3}, "train": TINY_TRAIN})
    images = np.zeros((8, 3, 64, 64), np.uint8)
    images[:, 0, :40] = 255  # red on most pixels, then black, then one green pixel per frame
    images[:, 1, 63, 63] = 255
    trainer = GANTrainer(params, images, torch.device("cpu"), precision=None)
    rgb = ((trainer.G.palette + 1) * 127.5).round().int().tolist()
    assert rgb == [[255, 0, 0], [0, 0, 0], [0, 255, 0]]
    assert torch.equal(trainer.ema.model.palette, trainer.G.palette)
    assert torch.isfinite(trainer.step()).all()


def test_spectral_norm_and_leaky_relu_options_train():
    trainer = trainer_for(tiny(spectral_norm=True, d_activation="leaky_relu", init="dcgan", loss="hinge"))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in trainer.D.modules())
    assert any(nn.utils.parametrize.is_parametrized(m) for m in trainer.D.modules())
    assert torch.isfinite(torch.stack([trainer.step() for _ in range(2)])).all()


def test_conditional_option_learns_the_game_mix_and_feeds_labels(tmp_path, monkeypatch):
    params = parse_params({"model": {**TINY_MODEL, "conditional": True}, "train": {**TINY_TRAIN, "iterations": 4},
                           "collect": {"games": ["Breakout-v4", "Pong-v4"]}})
    rng = np.random.default_rng(0)
    labels = np.array([0] * 36 + [1] * 12)
    arrays = {"train_images": rng.integers(0, 256, (48, 3, 64, 64), dtype=np.uint8), "train_labels": labels,
              "holdout_images": rng.integers(0, 256, (8, 3, 64, 64), dtype=np.uint8),
              "holdout_labels": np.zeros(8, np.int64)}
    write_snapshot(tmp_path / "snap", arrays, {"games": ["Breakout-v4", "Pong-v4"]})
    snap = load_snapshot(tmp_path / "snap")
    seen = []
    original = Discriminator.forward

    def spy(self, x, labels=None):
        seen.append(labels)
        return original(self, x, labels)

    monkeypatch.setattr(Discriminator, "forward", spy)
    result = train_gan(params, snap, checkpoint_dir=None, progress=False)
    assert torch.allclose(result.ema_generator.class_freq, torch.tensor([0.75, 0.25]))
    assert seen and all(y is not None and set(y.tolist()) <= {0, 1} for y in seen)
    other = params.model_copy(update={"collect": params.collect.model_copy(update={"games": ["Pong-v4", "Breakout-v4"]})})
    with pytest.raises(SnapshotError, match=r"model.conditional: the snapshot holds the games .*dvc repro collect"):
        train_gan(other, snap, checkpoint_dir=None, progress=False)


def test_cuda_graphs_option_is_ignored_off_cuda(caplog):
    # cuda_graphs is on by default; on a CPU it simply does not apply, so it must not warn.
    with caplog.at_level(logging.WARNING, logger="src.train"):
        trainer = trainer_for(tiny(cuda_graphs=True))
    assert not trainer.graphed and "running eagerly" not in caplog.text
    assert torch.isfinite(trainer.step()).all() and trainer.step_count == 1


def test_compile_option_trains():
    trainer = trainer_for(tiny(compile=True))
    rows = torch.stack([trainer.step() for _ in range(2)])
    assert torch.isfinite(rows).all()
    assert trainer._d_for_g is not trainer.D  # the step really ran through the compiled modules


# Devices and inputs ------------------------------------------------------------------------


def test_cuda_requested_but_absent_is_a_clear_error(monkeypatch, snapshot):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="train.device = 'cuda'.*set train.device to auto or cpu"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(DeviceError):
        train_gan(tiny(device="cuda:0"), snapshot, checkpoint_dir=None, progress=False)


def test_snapshot_of_other_image_shape_is_refused(tmp_path):
    small = make_snapshot(tmp_path / "small", shape=(3, 32, 32))
    with pytest.raises(SnapshotError, match=r"shape \(3, 32, 32\).*\(3, 64, 64\).*dvc repro collect"):
        train_gan(tiny(), small, checkpoint_dir=None, progress=False)


def test_missing_snapshot_stops_main_before_training(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text(json.dumps({"model": TINY_MODEL, "train": TINY_TRAIN}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SnapshotError, match="no snapshot"):
        train.main()
    assert not (tmp_path / "models").exists()


# The loop ----------------------------------------------------------------------------------


def test_callbacks_history_and_best_fid(snapshot, tmp_path):
    logged, images, fid_steps = [], [], []
    fids = {5: 30.0, 10: 20.0, 15: 25.0, 20: 40.0}

    def fid_fn(step, gen):
        assert not gen.training
        fid_steps.append(step)
        return fids[step]

    result = train_gan(
        tiny(fid_every=5, image_every=10, ema_decay=0.9), snapshot, checkpoint_dir=tmp_path / "ckpt",
        fid_fn=fid_fn, log_fn=lambda s, m: logged.append((s, m)),
        image_fn=lambda s, r, f: images.append((s, r.shape, r.dtype, f.shape, f.dtype)), progress=False,
    )
    assert result.iterations == 20 and result.stopped_by == "iterations"
    assert fid_steps == [5, 10, 15, 20]
    assert (result.best_fid, result.best_step) == (20.0, 10)
    assert [row["step"] for row in result.loss_history] == [5, 10, 15, 20]
    loss_logs = [m for _, m in logged if "loss_g" in m]
    assert len(loss_logs) == 4
    assert all(set(m) == {"loss_g", "loss_d", "d_real", "d_fake", "images_per_s"} for m in loss_logs)
    assert 0 < loss_logs[-1]["d_real"] < 1 and loss_logs[-1]["images_per_s"] > 0
    assert images == [(s, (64, 3, 64, 64), torch.uint8, (64, 3, 64, 64), torch.uint8) for s in (10, 20)]
    assert result.eval_generator is result.ema_generator
    best = result.best_state  # the EMA weights of step 10, not the final ones
    assert best is not None and not torch.equal(best["pipe.0.weight"], result.ema_generator.pipe[0].weight)


def test_fid_callback_exceptions_propagate(snapshot):
    class Pruned(Exception):
        pass

    def fid_fn(step, gen):
        raise Pruned

    with pytest.raises(Pruned):
        train_gan(tiny(fid_every=5), snapshot, checkpoint_dir=None, fid_fn=fid_fn, progress=False)


def test_time_budget_stops_early_with_full_outputs(snapshot, tmp_path):
    params = tiny(iterations=1_000_000, time_budget_s=1.0, fid_every=0, ema_decay=0.9)
    result = train_gan(params, snapshot, checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert result.stopped_by == "time_budget"
    assert 0 < result.iterations < 1_000_000 and 1.0 <= result.elapsed_s < 5.0
    written = write_outputs(result, params, snapshot, root=tmp_path / "out")
    for name in ("models/generator.pt", "models/generator_ema.pt", "models/discriminator.pt", "models/run.json",
                 "metrics/train.json", "plots/train/losses.csv", "plots/train/samples.png"):
        assert (tmp_path / "out" / name).is_file(), name
    assert "generator_best.pt" not in written and not (tmp_path / "out/plots/train/fid.csv").exists()
    metrics = json.loads((tmp_path / "out/metrics/train.json").read_text())
    assert metrics["iterations"] == result.iterations and metrics["stopped_by_time_budget"] is True
    assert {"loss_g", "loss_d", "d_real", "d_fake", "images_per_s", "elapsed_s"} <= set(metrics)
    # The budget counts across resumes: a rerun finds it spent and trains no further.
    again = train_gan(params, snapshot, checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert again.iterations == result.iterations and again.stopped_by == "time_budget"


def test_non_finite_loss_stops_with_iteration_and_last_good_checkpoint(snapshot, tmp_path, monkeypatch):
    calls = {"n": 0}
    clean = DeviceSampler.sample_labelled

    def poisoned(self, batch_size):
        calls["n"] += 1
        batch, labels = clean(self, batch_size)
        return (batch.fill_(float("nan")) if calls["n"] >= 16 else batch), labels

    monkeypatch.setattr(DeviceSampler, "sample_labelled", poisoned)
    ckpt_dir = tmp_path / "ckpt"
    with pytest.raises(NonFiniteLossError) as err:
        train_gan(tiny(log_every=4, checkpoint_every=10), snapshot, checkpoint_dir=ckpt_dir, progress=False)
    message = str(err.value)
    assert "non-finite loss at iteration 16" in message
    assert f"{ckpt_dir / 'checkpoint.pt'} (iteration 10), is untouched" in message
    ckpt = torch.load(ckpt_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 10
    assert all(torch.isfinite(v).all() for v in ckpt["model"]["generator"].values() if v.is_floating_point())


def test_mismatched_checkpoint_is_ignored_and_report_settings_still_resume(snapshot, tmp_path, caplog):
    ckpt_dir = tmp_path / "ckpt"
    train_gan(tiny(iterations=10), snapshot, checkpoint_dir=ckpt_dir, progress=False)
    with caplog.at_level(logging.INFO, logger="src.train"):
        more = train_gan(tiny(iterations=15, log_every=3), snapshot, checkpoint_dir=ckpt_dir, progress=False)
    assert "resuming from" in caplog.text and "iteration 10" in caplog.text
    assert more.iterations == 15 and more.loss_history[0]["step"] == 5  # history carried over
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="src.train"):
        other = train_gan(tiny(iterations=5, lr_d=1e-3), snapshot, checkpoint_dir=ckpt_dir, progress=False)
    assert "ignoring checkpoint" in caplog.text and "other training params or another snapshot" in caplog.text
    assert other.iterations == 5


# Interruption and resume (subprocesses) -------------------------------------------------------

RUNNER = textwrap.dedent(
    """
    import json, logging, sys, time
    from pathlib import Path
    logging.basicConfig(level=logging.INFO)
    import torch
    torch.set_num_threads(1)
    from src.data import load_snapshot
    from src.params import parse_params
    from src.train import TrainingInterrupted, train_gan

    cfg = json.loads(sys.argv[1])
    def log_fn(step, metrics):
        Path(cfg["progress"]).write_text(str(step))
        time.sleep(cfg["sleep"])
    try:
        result = train_gan(parse_params(cfg["params"]), load_snapshot(Path(cfg["snapshot"])),
                           checkpoint_dir=Path(cfg["ckpt"]), log_fn=log_fn, progress=False)
    except TrainingInterrupted as exc:
        print(exc, file=sys.stderr)
        sys.exit(128 + exc.signum)
    torch.save({k: v for k, v in result.generator.state_dict().items()}, cfg["out"])
    """
)


def start_runner(tmp_path: Path, name: str, snapshot_path: Path, params: dict, sleep: float):
    cfg = {"params": params, "snapshot": str(snapshot_path), "ckpt": str(tmp_path / f"ckpt_{name}"),
           "progress": str(tmp_path / f"progress_{name}"), "out": str(tmp_path / f"{name}.pt"), "sleep": sleep}
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(cfg)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, cfg


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"runner ended early ({proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("runner made no progress")
        time.sleep(0.01)


def test_resume_after_sigkill_equals_an_uninterrupted_run(snapshot, tmp_path):
    params = {"seed": 3, "model": TINY_MODEL,
              "train": {**TINY_TRAIN, "iterations": 40, "log_every": 2, "checkpoint_every": 10, "ema_decay": 0.9,
                        "augment": "color,translation", "loss": "bce", "lr_decay": "linear"}}
    reference, ref_cfg = start_runner(tmp_path, "reference", snapshot.path, params, sleep=0.0)
    killed, cfg = start_runner(tmp_path, "killed", snapshot.path, params, sleep=0.05)
    ckpt = Path(cfg["ckpt"]) / "checkpoint.pt"
    progress = Path(cfg["progress"])
    wait_for(lambda: ckpt.exists() and progress.exists() and int(progress.read_text() or 0) >= 14, killed)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=30) == -signal.SIGKILL
    step_at_kill = torch.load(ckpt, weights_only=False)["step"]
    assert 10 <= step_at_kill < 40
    resumed, _ = start_runner(tmp_path, "killed", snapshot.path, params, sleep=0.0)
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert f"at iteration {step_at_kill}" in err
    _, ref_err = reference.communicate(timeout=120)
    assert reference.returncode == 0, ref_err
    a, b = torch.load(cfg["out"]), torch.load(ref_cfg["out"])
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit, BN statistics included


def test_sigterm_writes_a_checkpoint_and_exits(snapshot, tmp_path):
    train_params = {**TINY_TRAIN, "iterations": 10_000, "log_every": 2, "checkpoint_every": 5_000}
    params = {"model": TINY_MODEL, "train": train_params}
    proc, cfg = start_runner(tmp_path, "term", snapshot.path, params, sleep=0.05)
    progress = Path(cfg["progress"])
    wait_for(lambda: progress.exists() and int(progress.read_text() or 0) >= 4, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM" in err and "Rerun" in err
    ckpt = torch.load(Path(cfg["ckpt"]) / "checkpoint.pt", weights_only=False)
    assert 4 <= ckpt["step"] < 10_000 and ckpt["step"] % 5_000 != 0


# DDP on CPU --------------------------------------------------------------------------------

DDP_RUNNER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    import torch.distributed as dist
    from src.data import DeviceSampler, load_snapshot
    from src.params import parse_params
    from src.train import init_distributed, train_gan

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


def test_ddp_on_cpu_with_two_processes(snapshot, tmp_path):
    script = tmp_path / "ddp_runner.py"
    script.write_text(DDP_RUNNER)
    cfg = {"params": {"model": TINY_MODEL, "train": {**TINY_TRAIN, "iterations": 6, "log_every": 3,
                                                      "checkpoint_every": 3, "augment": "translation"}},
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
    ckpt = torch.load(tmp_path / "ckpt" / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 6 and len(ckpt["rng"]) == 2


# The stage with MLflow --------------------------------------------------------------------


def test_main_tracks_the_run_in_mlflow(tmp_path, monkeypatch):
    make_snapshot(tmp_path / "data" / "snapshot")
    params = {"model": TINY_MODEL, "train": {**TINY_TRAIN, "iterations": 6, "log_every": 2, "checkpoint_every": 3,
                                             "image_every": 3, "ema_decay": 0.9}}
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.setenv("DVC_EXP_NAME", "test-exp")
    train.main()

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
    assert [m.step for m in history] == [2, 3, 4, 6] and all(math.isfinite(m.value) for m in history)
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
    assert json.loads((tmp_path / "metrics" / "train.json").read_text())["iterations"] == 6
    lines = (tmp_path / "plots" / "train" / "losses.csv").read_text().splitlines()
    assert lines[0] == "step,loss_g,loss_d,d_real,d_fake" and len(lines) == 5

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
        assert [m["step"] for m in history] == [2, 3, 4, 6]
        images = get(f"/api/2.0/mlflow/artifacts/list?run_id={run_id}&path=images")["files"]
        assert any(f["path"].startswith("images/fake+step+6+") for f in images)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
