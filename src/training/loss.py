"""The GAN losses: D's and G's loss for each `train.loss`, the WGAN gradient penalty, R1/R2, the names a step reports.

`rpgan` is the relativistic pairing loss (Jolicoeur-Martineau 2019; with R1 and R2 the R3GAN baseline,
Huang et al. 2024): D scores each real screen against the fake drawn beside it, D(x_i) - D(G(z_i)), so
G's loss needs the real logits too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# What one training step returns, in this order (see GANTrainer.step).
LOSS_KEYS = ("loss_g", "loss_d", "d_real", "d_fake")


def discriminator_loss(kind: str, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """D's loss on real and fake logits (sums of the two halves, as in the article)."""
    real_logits, fake_logits = real_logits.float(), fake_logits.float()
    if kind == "bce":
        # The article's BCELoss(sigmoid(x), 1) + BCELoss(sigmoid(y), 0), in the logit form.
        return F.binary_cross_entropy_with_logits(
            real_logits, torch.ones_like(real_logits)
        ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    if kind == "hinge":
        return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()
    if kind == "wgan-gp":
        return fake_logits.mean() - real_logits.mean()
    if kind == "rpgan":
        return F.softplus(fake_logits - real_logits).mean()
    raise ValueError(f"unknown loss {kind!r}")


def generator_loss(kind: str, fake_logits: torch.Tensor, real_logits: torch.Tensor | None = None) -> torch.Tensor:
    """G's loss on D's fake logits; `rpgan` also needs the paired real logits (constants for G)."""
    fake_logits = fake_logits.float()
    if kind == "rpgan":
        if real_logits is None:
            raise ValueError("the rpgan loss pairs each fake with a real: pass real_logits")
        return F.softplus(real_logits.detach().float() - fake_logits).mean()
    if kind == "bce":
        # Non-saturating: G maximises log D(G(z)), the article's BCELoss(D(G(z)), 1).
        return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
    if kind in ("hinge", "wgan-gp"):
        return -fake_logits.mean()
    raise ValueError(f"unknown loss {kind!r}")


def gradient_penalty(
    discriminator: Callable[[torch.Tensor], torch.Tensor],
    real: torch.Tensor,
    fake: torch.Tensor,
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """Gulrajani et al. 2017: E[(||grad_x D(x)|| - 1)^2] at random points between real and fake."""
    alpha = torch.rand(real.size(0), 1, 1, 1, device=real.device, generator=gen)
    mixed = (alpha * real.float() + (1 - alpha) * fake.float()).detach().requires_grad_(True)
    out = discriminator(mixed)
    (grad,) = torch.autograd.grad(out.float().sum(), mixed, create_graph=True)
    return ((grad.float().flatten(1).norm(dim=1) - 1.0) ** 2).mean()


def r1_penalty(discriminator: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """Mescheder et al. 2018: E[||grad_x D(x)||^2] (the caller scales it by gamma / 2).

    On real images it is R1; on generated ones (detached: a penalty on D only) R2.
    """
    images = images.detach().float().requires_grad_(True)
    out = discriminator(images)
    (grad,) = torch.autograd.grad(out.float().sum(), images, create_graph=True)
    return grad.float().flatten(1).pow(2).sum(dim=1).mean()
