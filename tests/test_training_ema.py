"""The generator's moving average (src/training/ema.py)."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from src.training.ema import EMA


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


def test_ema_rampup_counts_the_horizon_in_images():
    model = nn.Linear(3, 2)
    # decay 0.9 at 16 images per update: a half-life of 16 * ln 0.5 / ln 0.9 = 105.3 images.
    ema = EMA(model, decay=0.9, warmup=1000, rampup=0.5, images_per_update=16)
    # After u updates the half-life is min(105.3, 0.5 * 16 * u) images, and decay = 0.5 ** (16 / half-life);
    # ema_warmup is not used.
    assert ema.decay_at(1) == pytest.approx(0.5 ** 2)
    assert ema.decay_at(4) == pytest.approx(0.5 ** 0.5)
    assert ema.decay_at(13) == pytest.approx(0.5 ** (16 / 104))  # 104 images: just short of the full horizon
    assert ema.decay_at(14) == pytest.approx(0.9) and ema.decay_at(10_000) == pytest.approx(0.9)
