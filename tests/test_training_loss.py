"""The GAN losses and the gradient penalty (src/training/loss.py)."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from src.training.loss import discriminator_loss, generator_loss, gradient_penalty, r1_penalty


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


def test_r1_penalty_of_a_quadratic_critic():
    # D(x) = sum(x^2) / 2 per image has gradient x, so R1 = mean over images of ||x||^2.
    real = torch.randn(5, 3, 4, 4)
    r1 = r1_penalty(lambda x: x.pow(2).flatten(1).sum(1) / 2, real)
    assert r1.item() == pytest.approx(real.flatten(1).pow(2).sum(1).mean().item(), rel=1e-5)
    assert r1.requires_grad  # it trains D: the penalty is differentiable in D's weights


def test_rpgan_pairs_each_real_with_its_fake():
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 3.0])
    softplus = torch.nn.functional.softplus
    # D: softplus(D(fake_i) - D(real_i)) averaged over pairs; G: the same with the roles swapped.
    assert discriminator_loss("rpgan", real, fake).item() == pytest.approx(
        (softplus(torch.tensor(-1.0)) + softplus(torch.tensor(3.0))).item() / 2)
    assert generator_loss("rpgan", fake, real).item() == pytest.approx(
        (softplus(torch.tensor(1.0)) + softplus(torch.tensor(-3.0))).item() / 2)
    # Pairing, not batch means: swapping two fakes changes the loss (a batch-mean loss would not notice).
    assert discriminator_loss("rpgan", real, fake.flip(0)).item() != pytest.approx(
        discriminator_loss("rpgan", real, fake).item())


def test_rpgan_generator_loss_needs_the_real_side_and_trains_only_through_the_fakes():
    with pytest.raises(ValueError, match="real_logits"):
        generator_loss("rpgan", torch.zeros(2))
    real, fake = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    generator_loss("rpgan", fake, real).backward()
    assert real.grad is None and fake.grad is not None and fake.grad.abs().sum() > 0
