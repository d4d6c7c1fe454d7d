"""DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training").

The same random, differentiable transforms are applied to real and generated images before
every discriminator call (in both the D and the G step), so D cannot memorise the small frozen
snapshot and G still receives gradients through the transform. Ported from the authors'
reference `DiffAugment_pytorch.py`; images are in [-1, 1], channels first. Randomness comes from
an explicit `torch.Generator` so a checkpoint can restore it exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from src.params import AUGMENTS, parse_policy


def _uniform(x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """One U[0, 1) value per image, broadcastable over C, H, W."""
    return torch.rand(x.size(0), 1, 1, 1, dtype=x.dtype, device=x.device, generator=gen)


def rand_brightness(x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    return x + (_uniform(x, gen) - 0.5)


def rand_saturation(x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (_uniform(x, gen) * 2) + mean


def rand_contrast(x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (_uniform(x, gen) + 0.5) + mean


def rand_translation(x: torch.Tensor, gen: torch.Generator | None = None, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by up to `ratio` of its size, filling with zeros (mid-grey)."""
    b, _, h, w = x.shape
    shift_h, shift_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dev = x.device
    tx = torch.randint(-shift_h, shift_h + 1, (b, 1, 1), device=dev, generator=gen)
    ty = torch.randint(-shift_w, shift_w + 1, (b, 1, 1), device=dev, generator=gen)
    gb, gx, gy = torch.meshgrid(
        torch.arange(b, device=dev), torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij"
    )
    gx = torch.clamp(gx + tx + 1, 0, h + 1)
    gy = torch.clamp(gy + ty + 1, 0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0])
    return padded.permute(0, 2, 3, 1).contiguous()[gb, gx, gy].permute(0, 3, 1, 2)


def rand_cutout(x: torch.Tensor, gen: torch.Generator | None = None, ratio: float = 0.5) -> torch.Tensor:
    """Zero one random square of `ratio` times the image size per image."""
    b, _, h, w = x.shape
    size_h, size_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dev = x.device
    ox = torch.randint(0, h + (1 - size_h % 2), (b, 1, 1), device=dev, generator=gen)
    oy = torch.randint(0, w + (1 - size_w % 2), (b, 1, 1), device=dev, generator=gen)
    gb, gx, gy = torch.meshgrid(
        torch.arange(b, device=dev), torch.arange(size_h, device=dev), torch.arange(size_w, device=dev), indexing="ij"
    )
    gx = torch.clamp(gx + ox - size_h // 2, min=0, max=h - 1)
    gy = torch.clamp(gy + oy - size_w // 2, min=0, max=w - 1)
    mask = torch.ones(b, h, w, dtype=x.dtype, device=dev)
    # A tensor (not a Python 0) keeps the write on the device, so the step can be a CUDA graph.
    mask.index_put_((gb, gx, gy), torch.zeros((), dtype=x.dtype, device=dev))
    return x * mask.unsqueeze(1)


AUGMENT_FNS: dict[str, list[Callable[..., torch.Tensor]]] = {
    "color": [rand_brightness, rand_saturation, rand_contrast],
    "translation": [rand_translation],
    "cutout": [rand_cutout],
}
assert set(AUGMENT_FNS) == set(AUGMENTS)


def diff_augment(x: torch.Tensor, policy: str | tuple[str, ...], gen: torch.Generator | None = None) -> torch.Tensor:
    """Apply the comma-separated `policy` (e.g. "color,translation,cutout"); "" returns x unchanged."""
    names = parse_policy(policy) if isinstance(policy, str) else policy
    for name in names:
        for fn in AUGMENT_FNS[name]:
            x = fn(x, gen)
    return x
