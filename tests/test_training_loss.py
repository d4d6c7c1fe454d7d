"""The GAN losses and the gradient penalty (src/training/loss.py)."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from src.training.loss import discriminator_loss, generator_loss, gradient_penalty


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
