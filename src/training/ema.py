"""The exponential moving average of the generator's weights (`train.ema_decay`, `ema_warmup`, `ema_rampup`)."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


class EMA:
    """An exponential moving average of a model's parameters; buffers (BN statistics) are copied.

    The decay ramps linearly from 0 to `decay` over the first `warmup` updates, so the average
    does not stay anchored to the random initial weights (0 = full decay from the start). With
    `rampup` > 0 (StyleGAN2-ADA's ramp) the horizon is counted in images instead: the average's
    half-life is at most `rampup` times the images seen so far, growing until it reaches `decay`'s.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: int = 0, *, rampup: float = 0.0,
                 images_per_update: int = 1):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.rampup = rampup
        self.images_per_update = images_per_update

    def decay_at(self, updates: int) -> float:
        """The decay used by update number `updates` (1 for the first update)."""
        if self.rampup > 0:
            full_half_life = self.images_per_update * math.log(0.5) / math.log(self.decay)
            half_life = min(full_half_life, self.rampup * updates * self.images_per_update)
            return 0.5 ** (self.images_per_update / half_life)
        if self.warmup <= 0:
            return self.decay
        return self.decay * min(1.0, updates / self.warmup)

    @torch.no_grad()
    def update(self, model: nn.Module, updates: int) -> None:
        weight = 1.0 - self.decay_at(updates)
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), weight)
        for ema_buf, buf in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_buf.copy_(buf)
