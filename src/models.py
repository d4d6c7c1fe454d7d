"""The generator and discriminator: the article's DCGAN, plus the options the field uses.

The architecture is that of the article's script (Lapan, `03_atari_gan.py`):
- D: conv 4x4/2 to `filters` -> ReLU -> conv 4x4/2 to 2f, BN, ReLU -> 4f, BN, ReLU -> 8f, BN, ReLU
  -> conv 4x4/1 to 1 -> sigmoid.
- G: convT 4x4/1 latent -> 8f, BN, ReLU -> 4f -> 2f -> f (convT 4x4/2, BN, ReLU each) -> convT 4x4/2
  to 3 channels -> tanh.
- PyTorch's default initialisation, biases on every convolution.

One deliberate difference in form, not in function: our discriminator returns the LOGIT and the
losses apply the sigmoid inside `binary_cross_entropy_with_logits`. That is the same function as
the article's `Sigmoid` + `BCELoss` (only more accurate where the sigmoid saturates: BCELoss
clamps log() at -100) and, unlike BCELoss, it is allowed under autocast.

Options: LeakyReLU(0.2) in D, DCGAN init (conv ~ N(0, 0.02), BN weight ~ N(1, 0.02), biases 0),
spectral norm in D. BatchNorm is dropped from D when spectral norm is on (SN-GAN), for the WGAN-GP
loss and for R1 (per-sample penalties; Gulrajani et al. 2017 and Mescheder et al. 2018 use no BN in D).
`arch: resnet` swaps both stacks for residual blocks at the same resolutions and widths (SN-GAN /
BigGAN style, Miyato et al. 2018): G's blocks are BN-ReLU-up-conv3-BN-ReLU-conv3 plus an upsampled 1x1
shortcut; D's are act-conv3-act-conv3-avgpool plus a pooled 1x1 shortcut, never with batch norm.
Upsampling in G is `transposed` (the article's), or `nearest` / `bilinear` resize + 3x3 conv (no
checkerboard, Odena et al. 2016). `skip_rgb` adds the StyleGAN2 "skip" output: the 8, 16 and 32 px
features each paint RGB through a 1x1 conv, and the image is their bilinearly upsampled sum plus the last
layer's, so coarse layout can be learned before fine detail. `minibatch_std` (Karras et al. 2018)
appends, before D's last layer, the standard deviation of the features over groups of that many images:
D sees how varied a batch is, which penalises a generator that repeats itself.
Class-conditional on the game (`num_classes` > 0): G takes a one-hot game label beside the noise,
D adds a projection term (Miyato & Koyama 2018): the mix of games is set by the labels, not
left to the generator (measured in benchmarks/RESULTS.md: not better FID at a 10-minute CPU budget).
Palette output (`palette_size` > 0): Atari screens are drawn from a small palette (in the default
snapshot 97% of pixels are one of the 16 commonest colours), so a generator in eval mode, the one that
draws screens, snaps each pixel to the nearest of the training frames' commonest colours: this removes
the coloured high-frequency noise a briefly trained DCGAN paints. Training sees the raw output: snapping
inside the training step too (straight-through gradients) was measured slower and no better
(benchmarks/RESULTS.md). `palette_head` builds the palette into G instead: its last layer paints one
logit per palette colour. `soft`: each pixel is the softmax-weighted mix of those colours; `hard`: each
pixel is its most likely colour, with the soft mix's gradients (straight-through, Bengio et al. 2013), so
G's raw output is a palette image and D judges exactly the kind of screen that is drawn.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from src.memory import check_fits
from src.params import IMAGE_SHAPE, Params

ACTIVATIONS = ("relu", "leaky_relu")
INITS = ("default", "dcgan")
UPSAMPLE_KINDS = ("transposed", "nearest", "bilinear")
PALETTE_HEADS = ("none", "soft", "hard")
ARCHS = ("dcgan", "resnet")
LEAKY_SLOPE = 0.2


def _act(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(LEAKY_SLOPE)
    raise ValueError(f"unknown activation {name!r}; allowed: {', '.join(ACTIVATIONS)}")


def dcgan_init_(module: nn.Module) -> None:
    """Radford et al. 2016: conv weights ~ N(0, 0.02), BN weights ~ N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}; allowed: {', '.join(allowed)}")


class Generator(nn.Module):
    """(B, latent_dim, 1, 1) noise -> (B, 3, 64, 64) images in [-1, 1].

    A stem turns the noise into 4x4 features (8f channels); four stages double the size
    (8x8 4f, 16x16 2f, 32x32 f, 64x64). `arch="dcgan"`, `upsample="transposed"`, `skip_rgb=False` is
    the article's network, module for module, so a seeded build draws the article's weights.
    """

    def __init__(self, latent_dim: int = 100, filters: int = 64, channels: int = IMAGE_SHAPE[0], init: str = "default",
                 upsample: str = "transposed", num_classes: int = 0, palette_size: int = 0, arch: str = "dcgan",
                 skip_rgb: bool = False, palette_head: str = "none"):
        super().__init__()
        _check_choice("init", init, INITS)
        _check_choice("upsample", upsample, UPSAMPLE_KINDS)
        _check_choice("arch", arch, ARCHS)
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        if num_classes:
            # The training frames' game mix, set by the trainer; labels default to it when not given.
            self.register_buffer("class_freq", torch.full((num_classes,), 1.0 / num_classes))
        _check_choice("palette_head", palette_head, PALETTE_HEADS)
        if palette_head != "none" and palette_size < 2:
            raise ValueError(f"palette_head needs a palette of 2 or more colours, got palette_size={palette_size}")
        self.palette_size = palette_size
        self.palette_head = palette_head
        if palette_size:
            # Colours in [-1, 1], commonest first; set from the training frames by the trainer.
            self.register_buffer("palette", torch.zeros(palette_size, channels))
        f = filters
        # A palette head paints one logit per palette colour; the pipe ends in their softmax, mixed in forward.
        out_channels, last = (channels, nn.Tanh()) if palette_head == "none" else (palette_size, nn.Softmax(dim=1))
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim + num_classes, f * 8, kernel_size=4, stride=1, padding=0),
            nn.BatchNorm2d(f * 8),
            nn.ReLU(),
        ]
        # Indices in `pipe` of the 8x8, 16x16 and 32x32 feature maps, with their widths (skip_rgb taps them).
        taps: dict[str, int] = {}
        for c_in, c_out in ((f * 8, f * 4), (f * 4, f * 2), (f * 2, f)):
            if arch == "dcgan":
                layers += [_up(c_in, c_out, upsample), nn.BatchNorm2d(c_out), nn.ReLU()]
            else:
                layers.append(ResBlockUp(c_in, c_out, upsample))
            taps[str(len(layers) - 1)] = c_out
        if arch == "dcgan":
            layers += [_up(f, out_channels, upsample), last]
        else:
            layers += [ResBlockUp(f, f, upsample), nn.BatchNorm2d(f), nn.ReLU(),
                       nn.Conv2d(f, out_channels, kernel_size=3, padding=1), last]
        self.pipe = nn.Sequential(*layers)
        self.to_rgb = nn.ModuleDict({i: nn.Conv2d(c, out_channels, kernel_size=1) for i, c in taps.items()}) \
            if skip_rgb else None
        if init == "dcgan":
            dcgan_init_(self)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes:
            if labels is None:
                labels = mix_labels(len(z), self.class_freq)
            onehot = nn.functional.one_hot(labels.long(), self.num_classes).to(z.dtype)
            z = torch.cat([z, onehot.view(len(z), self.num_classes, 1, 1)], dim=1)
        x = self.pipe(z) if self.to_rgb is None else self._skip_forward(z)
        if self.palette_head != "none":
            x = self._paint_palette(x)
        return snap_to_palette(x, self.palette) if self.palette_size and not self.training else x

    def _paint_palette(self, probs: torch.Tensor) -> torch.Tensor:
        """(B, K, H, W) colour probabilities -> (B, 3, H, W): their mix of the palette (soft), or each pixel's
        likeliest colour with the mix's gradient (hard, straight-through)."""
        if self.palette_head == "hard":
            hard = nn.functional.one_hot(probs.argmax(dim=1), probs.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
            probs = hard + (probs - probs.detach())  # exactly `hard` forward; the soft gradient backward
        return torch.einsum("bkhw,kc->bchw", probs, self.palette.to(probs.dtype))

    def _skip_forward(self, z: torch.Tensor) -> torch.Tensor:
        """The pipe, with each tapped resolution's RGB (or palette logits) added to the upsampled sum of the
        coarser ones, before the last activation."""
        rgb = None
        x = z
        for i, layer in enumerate(self.pipe[:-1]):  # all but the final activation (tanh or softmax)
            x = layer(x)
            if str(i) in self.to_rgb:
                rgb = self.to_rgb[str(i)](x) + (0 if rgb is None else _upsample_to(rgb, x))
        return self.pipe[-1](x + _upsample_to(rgb, x))


def _upsample_to(image: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return nn.functional.interpolate(image, size=like.shape[-2:], mode="bilinear", align_corners=False)


class ResBlockUp(nn.Module):
    """G's residual block: twice the size, `c_in` -> `c_out` channels (BN-ReLU-up-conv3-BN-ReLU-conv3 + shortcut)."""

    def __init__(self, c_in: int, c_out: int, upsample: str):
        super().__init__()
        self.residual = nn.Sequential(nn.BatchNorm2d(c_in), nn.ReLU(), _up(c_in, c_out, upsample),
                                      nn.BatchNorm2d(c_out), nn.ReLU(), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.shortcut = nn.Sequential(_resize_up(upsample), nn.Conv2d(c_in, c_out, kernel_size=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.shortcut(x)


class ResBlockDown(nn.Module):
    """D's residual block: half the size, `c_in` -> `c_out` channels, no batch norm.

    The first block (`first=True`, on images) skips the leading activation, as in SN-GAN.
    """

    def __init__(self, c_in: int, c_out: int, activation: str, first: bool = False):
        super().__init__()
        layers = [] if first else [_act(activation)]
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), _act(activation), nn.Conv2d(c_out, c_out, 3, padding=1),
                   nn.AvgPool2d(2)]
        self.residual = nn.Sequential(*layers)
        self.shortcut = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(c_in, c_out, kernel_size=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.shortcut(x)


def minibatch_std(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """`x` (B, C, H, W) with one channel more: the mean standard deviation of the features over each
    group of `group_size` images (Karras et al. 2018), the same value for every image of a group.

    Groups are interleaved (image i is in group i % (B // g)) as in StyleGAN; the group size is the
    largest divisor of B not above `group_size`, so any batch size works.
    """
    b, c, h, w = x.shape
    g = max(d for d in range(1, min(group_size, b) + 1) if b % d == 0)
    y = x.float().reshape(g, b // g, c, h, w)
    # Spelled out rather than y.var(dim=0): on CPU, var over the leading dim of a channels_last batch
    # took ~4x longer (forward + backward), ~8% of a training step at width 32.
    variance = (y - y.mean(dim=0)).square().mean(dim=0)
    std = (variance + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (B // g,)
    std = std.repeat(g).view(b, 1, 1, 1).expand(b, 1, h, w).to(x.dtype)
    return torch.cat([x, std], dim=1)


def snap_to_palette(x: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """Each pixel of `x` (B, C, H, W) replaced by its nearest colour of `palette` (K, C)."""
    flat = x.detach().float().permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    nearest = torch.cdist(flat, palette.float()).argmin(dim=1)
    snapped = palette[nearest].view(x.shape[0], x.shape[2], x.shape[3], x.shape[1]).permute(0, 3, 1, 2)
    return snapped.to(x.dtype).contiguous()


def snap_images(images: np.ndarray | torch.Tensor, palette: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """uint8 (N, 3, H, W) frames with each pixel snapped to its nearest `palette` colour, as uint8."""
    from src.data import to_uint8

    x = torch.as_tensor(np.array(images)).float().div(127.5).sub(1.0)
    return torch.cat([to_uint8(snap_to_palette(c, palette.float())) for c in x.split(chunk)])


def palette_of(images: np.ndarray, size: int, every: int = 10) -> torch.Tensor:
    """The `size` commonest colours of uint8 (N, 3, H, W) frames (every `every`-th frame), as (size, 3) in [-1, 1].

    Ties go to the smaller 24-bit colour code, so the palette is the same on every machine.
    Fewer distinct colours than `size`: the list repeats its last colour.
    """
    sample = np.asarray(images[::every], dtype=np.uint8)
    codes = (sample[:, 0].astype(np.int64) << 16) | (sample[:, 1].astype(np.int64) << 8) | sample[:, 2]
    counts = np.bincount(codes.ravel(), minlength=1 << 24)
    order = np.argsort(-counts, kind="stable")[:size]
    order = order[counts[order] > 0]
    order = np.concatenate([order, np.repeat(order[-1:], size - len(order))])
    rgb = np.stack([(order >> 16) & 255, (order >> 8) & 255, order & 255], axis=1)
    return torch.from_numpy(rgb.astype(np.float32) / 127.5 - 1.0)


def mix_labels(n: int, freq: torch.Tensor) -> torch.Tensor:
    """`n` labels in the proportions `freq`, interleaved, the same every call (no random draw).

    A golden-ratio sequence spreads n points evenly over [0, 1): each class gets its share of any
    prefix, so a sample grid shows every game and a FID sample has the training mix.
    """
    points = (torch.arange(n, device=freq.device, dtype=torch.float64) * 0.6180339887498949) % 1.0
    return torch.searchsorted(torch.cumsum(freq.double(), 0)[:-1].contiguous(), points, right=True)


def _up(c_in: int, c_out: int, kind: str) -> nn.Module:
    """Twice the spatial size, `c_in` -> `c_out` channels."""
    if kind == "transposed":
        return nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1)
    return nn.Sequential(_resize_up(kind), nn.Conv2d(c_in, c_out, kernel_size=3, padding=1))


def _resize_up(kind: str) -> nn.Module:
    """Twice the spatial size by resizing alone (`transposed` convs resize as nearest here: shortcuts only)."""
    if kind == "bilinear":
        return nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
    return nn.Upsample(scale_factor=2, mode="nearest")


class Discriminator(nn.Module):
    """(B, 3, 64, 64) images -> (B,) logits (the article's sigmoid lives in the loss).

    Features at 4x4 (8f channels), then one 4x4 convolution to the logit. `arch="dcgan"` halves the
    size with 4x4 stride-2 convolutions (the article's); `"resnet"` with residual blocks, never with BN.
    """

    def __init__(
        self,
        filters: int = 64,
        activation: str = "relu",
        spectral_norm: bool = False,
        batch_norm: bool | None = None,
        channels: int = IMAGE_SHAPE[0],
        init: str = "default",
        num_classes: int = 0,
        arch: str = "dcgan",
        minibatch_std: int = 0,
    ):
        super().__init__()
        _check_choice("init", init, INITS)
        _check_choice("arch", arch, ARCHS)
        self.num_classes = num_classes
        self.minibatch_std = minibatch_std
        if batch_norm is None:
            batch_norm = not spectral_norm
        f = filters
        widths = ((f, f * 2), (f * 2, f * 4), (f * 4, f * 8))
        if arch == "dcgan":
            layers: list[nn.Module] = [nn.Conv2d(channels, f, kernel_size=4, stride=2, padding=1), _act(activation)]
            for c_in, c_out in widths:
                layers.append(nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(c_out))
                layers.append(_act(activation))
        else:
            layers = [ResBlockDown(channels, f, activation, first=True)]
            layers += [ResBlockDown(c_in, c_out, activation) for c_in, c_out in widths]
            layers.append(_act(activation))
        extra = 1 if minibatch_std else 0
        layers.append(nn.Conv2d(f * 8 + extra, 1, kernel_size=4, stride=1, padding=0))
        self.pipe = nn.Sequential(*layers)
        self.embed = nn.Embedding(num_classes, f * 8) if num_classes else None
        if self.embed is not None:
            nn.init.normal_(self.embed.weight, 0.0, 0.02)  # N(0, 1) would swamp the unconditional logit
        if init == "dcgan":
            dcgan_init_(self)
        if spectral_norm:
            # After init: the parametrisation normalises whatever weights it is given.
            for m in self.pipe.modules():
                if isinstance(m, nn.Conv2d):
                    nn.utils.parametrizations.spectral_norm(m)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is None and not self.minibatch_std:
            return self.pipe(x).view(-1)
        features = self.pipe[:-1](x)
        head_in = minibatch_std(features, self.minibatch_std) if self.minibatch_std else features
        logits = self.pipe[-1](head_in).view(-1)
        if self.embed is None:
            return logits
        if labels is None:
            raise ValueError("this discriminator is class-conditional: pass the game labels")
        return logits + (self.embed(labels.long()).to(features.dtype) * features.sum(dim=(2, 3))).sum(dim=1)


def model_kwargs(params: Params) -> dict[str, dict]:
    """Constructor arguments of both networks from EFFECTIVE params (stored beside saved weights)."""
    m, t = params.model, params.train
    classes = len(params.collect.games) if m.conditional else 0
    return {
        "generator": {"latent_dim": m.latent_dim, "filters": m.gen_filters, "init": t.init, "upsample": m.upsample,
                      "num_classes": classes, "palette_size": m.palette_size, "arch": m.arch, "skip_rgb": m.skip_rgb,
                      "palette_head": m.palette_head},
        "discriminator": {
            "num_classes": classes,
            "filters": m.disc_filters,
            "activation": t.d_activation,
            "spectral_norm": t.spectral_norm,
            # Per-sample penalties (WGAN-GP, R1) and spectral norm go without BN in D, as in their papers.
            "batch_norm": not (t.spectral_norm or t.loss == "wgan-gp" or t.penalty_gamma > 0) and m.arch == "dcgan",
            "init": t.init,
            "arch": m.arch,
            "minibatch_std": m.minibatch_std,
        },
    }


TRAINING_COPIES = 5  # float32 copies of each weight in training: itself, its gradient, Adam's two moments, the EMA


def check_models_fit(params: Params) -> None:
    """Refuse networks (EFFECTIVE params) whose training state this machine cannot hold, before building them."""
    kwargs = model_kwargs(params)
    with torch.device("meta"):  # sizes only: nothing is allocated, no random number drawn
        weights = sum(p.numel() for kind, cls in (("generator", Generator), ("discriminator", Discriminator))
                      for p in cls(**kwargs[kind]).parameters())
    m = params.model
    check_fits(weights * 4 * TRAINING_COPIES, f"the networks' {weights:,} weights, with gradients and optimiser state,",
               f"lower model.gen_filters ({m.gen_filters}), model.disc_filters ({m.disc_filters}) or model.latent_dim "
               f"({m.latent_dim})")


def build_models(params: Params) -> tuple[Generator, Discriminator]:
    """Both networks from EFFECTIVE params (`src.params.effective`), in the global torch RNG.

    D is built first, as in the article's script, so a seeded build draws the same initial weights.
    """
    kwargs = model_kwargs(params)
    check_models_fit(params)
    discriminator = Discriminator(**kwargs["discriminator"])
    generator = Generator(**kwargs["generator"])
    return generator, discriminator


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """`module` in eval mode inside the block, back in the mode it had after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of `module`'s state dict, contiguous (what files and checkpoints keep)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}
