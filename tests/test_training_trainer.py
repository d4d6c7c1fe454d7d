"""One training step and each option of it (src/training/trainer.py): detach, losses, R1, EMA, augment, precision,
palette, conditional, architectures, compile."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

import src.training.trainer as trainer_module
from src.data import SnapshotError, load_snapshot, write_snapshot
from src.models import Discriminator
from src.params import effective, parse_params
from src.training import GANTrainer, train_gan
from tests.conftest import TINY_MODEL, TINY_TRAIN, tiny


def trainer_for(params, frames: int = 32) -> GANTrainer:
    images = np.random.default_rng(1).integers(0, 256, (frames, 3, 64, 64), dtype=np.uint8)
    precision = torch.bfloat16 if params.train.precision == "bf16" else None
    return GANTrainer(effective(params), images, torch.device("cpu"), precision=precision)


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
    real_gp = trainer_module.gradient_penalty
    monkeypatch.setattr(trainer_module, "gradient_penalty", lambda *a, **k: calls.append(1) or real_gp(*a, **k))
    trainer = trainer_for(tiny(loss=loss))
    before = [p.detach().clone() for p in trainer.G.parameters()]
    rows = torch.stack([trainer.step() for _ in range(2)])
    assert torch.isfinite(rows).all()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.G.parameters(), strict=True))
    assert len(calls) == (2 if loss == "wgan-gp" else 0)


def test_lazy_r1_runs_every_r1_every_steps_with_its_weight(monkeypatch):
    calls = []
    real_r1 = trainer_module.r1_penalty

    def spy(critic, real):
        value = real_r1(critic, real)
        calls.append(value.item())
        return value

    monkeypatch.setattr(trainer_module, "r1_penalty", spy)
    trainer = trainer_for(tiny(r1_gamma=2.0, r1_every=3))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in trainer.D.modules())
    plain_losses = []
    real_loss = trainer_module.discriminator_loss
    monkeypatch.setattr(trainer_module, "discriminator_loss",
                        lambda *a: plain_losses.append(real_loss(*a)) or plain_losses[-1])
    rows = torch.stack([trainer.step() for _ in range(7)])
    assert torch.isfinite(rows).all()
    assert len(calls) == 3  # steps 0, 3 and 6
    # The penalty enters D's loss as gamma / 2 * r1_every * R1: loss_d reported = plain loss + that.
    regularised = [0, 3, 6]
    for i, step in enumerate(regularised):
        assert rows[step, 1].item() == pytest.approx(plain_losses[step].item() + 2.0 / 2 * 3 * calls[i], rel=1e-4)
    assert rows[1, 1].item() == pytest.approx(plain_losses[1].item(), rel=1e-6)


def test_r2_and_the_gamma_schedule_weigh_the_penalty_on_generated_screens(monkeypatch):
    penalised = []
    real_r1 = trainer_module.r1_penalty

    def spy(critic, images):
        value = real_r1(critic, images)
        penalised.append((images, value.item()))
        return value

    monkeypatch.setattr(trainer_module, "r1_penalty", spy)
    trainer = trainer_for(tiny(loss="rpgan", r1_gamma=0.0, r2_gamma=2.0, r1_every=2))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in trainer.D.modules())  # R2 alone drops BN as R1 does
    plain = []
    real_loss = trainer_module.discriminator_loss
    monkeypatch.setattr(trainer_module, "discriminator_loss", lambda *a: plain.append(real_loss(*a)) or plain[-1])
    trainer.set_gamma_scale(0.5)
    rows = torch.stack([trainer.step() for _ in range(3)])
    assert len(penalised) == 2  # steps 0 and 2; R1 is off, so each is R2 alone
    for images, _ in penalised:  # on generated screens: values G's tanh draws, off the uint8 frames' grid
        on_grid = (images + 1) * 127.5
        assert not torch.allclose(on_grid, on_grid.round(), atol=1e-3)
    for (_, value), step in zip(penalised, (0, 2), strict=True):
        assert rows[step, 1].item() == pytest.approx(plain[step].item() + 0.5 * 2.0 / 2 * 2 * value, rel=1e-4)


def test_new_architecture_options_train():
    model = {**TINY_MODEL, "arch": "resnet", "upsample": "bilinear", "skip_rgb": True, "minibatch_std": 4,
             "palette_size": 4, "palette_head": "hard"}
    trainer = trainer_for(parse_params({"model": model, "train": TINY_TRAIN}))
    before = [p.detach().clone() for p in trainer.G.parameters()]
    rows = torch.stack([trainer.step() for _ in range(2)])
    assert torch.isfinite(rows).all()
    assert all(not torch.equal(a, b) for a, b in zip(before, trainer.G.parameters(), strict=True))
    assert trainer.G.palette.abs().sum() > 0  # the head mixes the training frames' colours, not the zero init


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
    real_aug = trainer_module.diff_augment

    def spy(x, policy, gen):
        calls.append((x.requires_grad, policy))
        return real_aug(x, policy, gen)

    monkeypatch.setattr(trainer_module, "diff_augment", spy)
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
    with caplog.at_level(logging.WARNING, logger="src.training"):
        trainer = trainer_for(tiny(cuda_graphs=True))
    assert not trainer.graphed and "running eagerly" not in caplog.text
    assert torch.isfinite(trainer.step()).all() and trainer.step_count == 1


@pytest.mark.parametrize("penalty", [{"r1_gamma": 1.0, "r1_every": 1}, {"loss": "wgan-gp", "r1_gamma": 0.0}],
                         ids=["r1", "wgan-gp"])
def test_compile_option_trains(penalty):
    # Both penalties need a double backward, which compiled modules lack: they must still train.
    trainer = trainer_for(tiny(compile=True, **penalty))
    rows = torch.stack([trainer.step() for _ in range(2)])
    assert torch.isfinite(rows).all()
    assert trainer._d_for_g is not trainer.D  # the step really ran through the compiled modules
