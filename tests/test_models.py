"""The networks (the article's DCGAN exactly, and each option) and DiffAugment."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from src.augment import AUGMENT_FNS, diff_augment, parse_policy
from src.evaluate import Drawn
from src.models import Discriminator, Generator, build_models, mix_labels, model_kwargs, palette_of, snap_to_palette
from src.params import Params, ParamsError, effective, parse_params


def article_params() -> Params:
    # Deliberately far from the article everywhere: the recipe must override all of it.
    return effective(
        parse_params(
            {
                "model": {"latent_dim": 7, "gen_filters": 5, "disc_filters": 3, "upsample": "nearest",
                          "arch": "resnet", "skip_rgb": True, "minibatch_std": 4, "palette_head": "soft"},
                "train": {"recipe": "article", "batch_size": 99, "lr_g": 0.5, "lr_d": 0.5, "beta1": 0.1,
                          "loss": "hinge", "d_activation": "leaky_relu", "init": "dcgan", "spectral_norm": True,
                          "ema_decay": 0.9, "augment": "color", "r1_gamma": 10.0},
            }
        )
    )


# The article's networks, transcribed from Lapan's 03_atari_gan.py (Sigmoid in D, BCELoss outside).
class ArticleDiscriminator(nn.Module):
    def __init__(self, input_shape=(3, 64, 64), filters=64):
        super().__init__()
        self.conv_pipe = nn.Sequential(
            nn.Conv2d(input_shape[0], filters, kernel_size=4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(filters, filters * 2, kernel_size=4, stride=2, padding=1),
            nn.BatchNorm2d(filters * 2),
            nn.ReLU(),
            nn.Conv2d(filters * 2, filters * 4, kernel_size=4, stride=2, padding=1),
            nn.BatchNorm2d(filters * 4),
            nn.ReLU(),
            nn.Conv2d(filters * 4, filters * 8, kernel_size=4, stride=2, padding=1),
            nn.BatchNorm2d(filters * 8),
            nn.ReLU(),
            nn.Conv2d(filters * 8, 1, kernel_size=4, stride=1, padding=0),
            nn.Sigmoid(),
        )

    def forward(self, x):
        return self.conv_pipe(x).view(-1, 1).squeeze(dim=1)


class ArticleGenerator(nn.Module):
    def __init__(self, output_shape=(3, 64, 64), latent=100, filters=64):
        super().__init__()
        self.pipe = nn.Sequential(
            nn.ConvTranspose2d(latent, filters * 8, kernel_size=4, stride=1, padding=0),
            nn.BatchNorm2d(filters * 8),
            nn.ReLU(),
            nn.ConvTranspose2d(filters * 8, filters * 4, kernel_size=4, stride=2, padding=1),
            nn.BatchNorm2d(filters * 4),
            nn.ReLU(),
            nn.ConvTranspose2d(filters * 4, filters * 2, kernel_size=4, stride=2, padding=1),
            nn.BatchNorm2d(filters * 2),
            nn.ReLU(),
            nn.ConvTranspose2d(filters * 2, filters, kernel_size=4, stride=2, padding=1),
            nn.BatchNorm2d(filters),
            nn.ReLU(),
            nn.ConvTranspose2d(filters, output_shape[0], kernel_size=4, stride=2, padding=1),
            nn.Tanh(),
        )

    def forward(self, x):
        return self.pipe(x)


def layer_list(module: nn.Module) -> list[str]:
    out = []
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            out.append(f"{type(m).__name__}({m.in_channels},{m.out_channels},k{m.kernel_size[0]},s{m.stride[0]},p{m.padding[0]})")
        elif isinstance(m, nn.BatchNorm2d):
            out.append(f"BN({m.num_features})")
        elif isinstance(m, (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid)):
            out.append(type(m).__name__)
    return out


def test_article_recipe_overrides_everything():
    p = article_params()
    assert (p.model.latent_dim, p.model.gen_filters, p.model.disc_filters, p.model.upsample) == (
        100, 64, 64, "transposed")
    t = p.train
    assert (t.batch_size, t.lr_g, t.lr_d, t.beta1, t.beta2) == (16, 1e-4, 1e-4, 0.5, 0.999)
    assert (t.loss, t.d_activation, t.init, t.spectral_norm, t.ema_decay, t.augment, t.d_steps, t.r1_gamma) == (
        "bce", "relu", "default", False, 0.0, "", 1, 0.0)
    assert (p.model.arch, p.model.skip_rgb, p.model.minibatch_std) == ("dcgan", False, 0)


def test_article_architecture_layers_and_parameter_counts():
    gen, disc = build_models(article_params())
    assert layer_list(disc) == [
        "Conv2d(3,64,k4,s2,p1)", "ReLU",
        "Conv2d(64,128,k4,s2,p1)", "BN(128)", "ReLU",
        "Conv2d(128,256,k4,s2,p1)", "BN(256)", "ReLU",
        "Conv2d(256,512,k4,s2,p1)", "BN(512)", "ReLU",
        "Conv2d(512,1,k4,s1,p0)",
    ]  # the article's final Sigmoid is inside the BCE-with-logits loss
    assert layer_list(gen) == [
        "ConvTranspose2d(100,512,k4,s1,p0)", "BN(512)", "ReLU",
        "ConvTranspose2d(512,256,k4,s2,p1)", "BN(256)", "ReLU",
        "ConvTranspose2d(256,128,k4,s2,p1)", "BN(128)", "ReLU",
        "ConvTranspose2d(128,64,k4,s2,p1)", "BN(64)", "ReLU",
        "ConvTranspose2d(64,3,k4,s2,p1)", "Tanh",
    ]
    # Counted by hand from the layer list (conv weights + biases, BN weight + bias).
    assert sum(p.numel() for p in disc.parameters()) == 2_766_529
    assert sum(p.numel() for p in gen.parameters()) == 3_577_667


def test_article_weights_and_outputs_equal_the_reference_script():
    torch.manual_seed(3)
    ref_d, ref_g = ArticleDiscriminator(), ArticleGenerator()  # the script builds D first
    torch.manual_seed(3)
    gen, disc = build_models(article_params())
    for ours, ref in ((gen, ref_g), (disc, ref_d)):
        pairs = list(zip(ours.parameters(), ref.parameters(), strict=True))
        assert all(torch.equal(a, b) for a, b in pairs)  # PyTorch default init, same order
    z = torch.randn(4, 100, 1, 1)
    torch.testing.assert_close(gen(z), ref_g(z), rtol=0, atol=0)
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    torch.testing.assert_close(torch.sigmoid(disc(x)), ref_d(x), rtol=1e-6, atol=1e-6)


def test_shapes_and_ranges():
    gen, disc = Generator(16, 8), Discriminator(8)
    images = gen(torch.randn(5, 16, 1, 1))
    assert images.shape == (5, 3, 64, 64)
    assert images.min() >= -1 and images.max() <= 1
    assert disc(images).shape == (5,)


def test_leaky_relu_option():
    disc = Discriminator(8, activation="leaky_relu")
    acts = [m for m in disc.modules() if isinstance(m, (nn.ReLU, nn.LeakyReLU))]
    assert len(acts) == 4 and all(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.2 for m in acts)
    with pytest.raises(ValueError, match="allowed: relu, leaky_relu"):
        Discriminator(8, activation="gelu")


def test_dcgan_init_draws_the_dcgan_distributions():
    torch.manual_seed(0)
    gen = Generator(100, 64, init="dcgan")
    convs = [m for m in gen.modules() if isinstance(m, nn.ConvTranspose2d)]
    bns = [m for m in gen.modules() if isinstance(m, nn.BatchNorm2d)]
    big = convs[1].weight  # 512x256x4x4: plenty of samples
    assert abs(big.mean().item()) < 1e-3 and abs(big.std().item() - 0.02) < 1e-3
    assert all(torch.count_nonzero(m.bias) == 0 for m in convs)
    bn_w = bns[0].weight
    assert abs(bn_w.mean().item() - 1) < 0.01 and abs(bn_w.std().item() - 0.02) < 0.01
    default = Generator(100, 64)
    assert torch.all(default.pipe[1].weight == 1)  # PyTorch's BN init, untouched


def test_spectral_norm_drops_batch_norm_and_bounds_sigma():
    torch.manual_seed(0)
    disc = Discriminator(8, spectral_norm=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in disc.modules())
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert all(nn.utils.parametrize.is_parametrized(m, "weight") for m in convs)
    x = torch.randn(4, 3, 64, 64)
    for _ in range(30):  # power iteration converges in train mode
        disc(x)
    disc.eval()
    for conv in convs:
        sigma = torch.linalg.matrix_norm(conv.weight.flatten(1), ord=2)
        assert abs(sigma.item() - 1) < 0.05


def test_wgan_gp_critic_has_no_batch_norm_and_options_reach_the_models():
    params = parse_params({"train": {"loss": "wgan-gp", "d_activation": "leaky_relu", "init": "dcgan"}})
    kwargs = model_kwargs(params)
    assert kwargs["discriminator"]["batch_norm"] is False
    gen, disc = build_models(params)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in disc.modules())
    assert any(isinstance(m, nn.LeakyReLU) for m in disc.modules())
    assert kwargs["generator"] == {"latent_dim": 100, "filters": 32, "init": "dcgan", "upsample": "transposed",
                                   "num_classes": 0, "palette_size": 16, "arch": "dcgan", "skip_rgb": False,
                                   "palette_head": "none"}


def test_nearest_upsampling_generator_has_no_transposed_convs_after_the_first_layer():
    gen, _ = build_models(parse_params({"model": {"latent_dim": 8, "gen_filters": 4, "upsample": "nearest"}}))
    kinds = [type(m).__name__ for m in gen.modules()]
    assert kinds.count("ConvTranspose2d") == 1  # the 1x1 -> 4x4 projection only
    assert kinds.count("Upsample") == 4 and kinds.count("Conv2d") == 4
    out = gen(torch.randn(3, 8, 1, 1))
    assert out.shape == (3, 3, 64, 64) and out.abs().max() <= 1
    with pytest.raises(ValueError, match="upsample='cubic'; allowed: transposed, nearest, bilinear"):
        Generator(upsample="cubic")


def test_bilinear_upsampling_resizes_bilinearly():
    gen, _ = build_models(parse_params({"model": {"latent_dim": 8, "gen_filters": 4, "upsample": "bilinear"}}))
    modes = [m.mode for m in gen.modules() if isinstance(m, nn.Upsample)]
    assert modes == ["bilinear"] * 4
    assert gen(torch.randn(2, 8, 1, 1)).shape == (2, 3, 64, 64)


def small_model(**model) -> tuple[Generator, Discriminator]:
    return build_models(parse_params({"model": {"latent_dim": 8, "gen_filters": 4, "disc_filters": 4, **model}}))


@pytest.mark.parametrize("upsample", ["transposed", "nearest", "bilinear"])
def test_resnet_arch_has_residual_blocks_and_no_batch_norm_in_d(upsample):
    from src.models import ResBlockDown, ResBlockUp

    gen, disc = small_model(arch="resnet", upsample=upsample, palette_size=0)
    assert sum(isinstance(m, ResBlockUp) for m in gen.modules()) == 4
    assert sum(isinstance(m, ResBlockDown) for m in disc.modules()) == 4
    assert not any(isinstance(m, nn.BatchNorm2d) for m in disc.modules())
    images = gen(torch.randn(3, 8, 1, 1))
    assert images.shape == (3, 3, 64, 64) and images.abs().max() <= 1
    assert disc(images).shape == (3,)
    # The shortcut carries signal: zeroing a block's residual branch leaves its output non-zero.
    block = next(m for m in gen.modules() if isinstance(m, ResBlockUp))
    with torch.no_grad():
        block.residual[-1].weight.zero_()
        block.residual[-1].bias.zero_()
    x = torch.randn(2, 32, 4, 4)
    assert torch.equal(block(x), block.shortcut(x)) and block(x).abs().sum() > 0


def test_skip_rgb_sums_the_rgb_of_every_resolution():
    torch.manual_seed(0)
    gen, _ = small_model(skip_rgb=True, palette_size=0)
    assert len(gen.to_rgb) == 3  # 8, 16 and 32 px; 64 px is the pipe's own last layer
    z = torch.randn(2, 8, 1, 1)
    out = gen(z)
    assert out.shape == (2, 3, 64, 64) and out.abs().max() <= 1
    # Only the 8 px RGB left: the image is that 8x8 picture, bilinearly doubled three times, through tanh.
    with torch.no_grad():
        last = gen.pipe[-2]
        last.weight.zero_()
        last.bias.zero_()
        for key in list(gen.to_rgb)[1:]:
            gen.to_rgb[key].weight.zero_()
            gen.to_rgb[key].bias.zero_()
        coarse = gen.to_rgb[list(gen.to_rgb)[0]](gen.pipe[: int(list(gen.to_rgb)[0]) + 1](z))
    assert coarse.shape[-1] == 8
    for size in (16, 32, 64):
        coarse = nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    expected = torch.tanh(coarse)
    torch.testing.assert_close(gen(z), expected)


def test_skip_rgb_only_adds_layers_to_the_plain_pipe():
    plain, _ = small_model(palette_size=0)
    skip, _ = small_model(palette_size=0, skip_rgb=True)
    assert plain.to_rgb is None
    extra = set(skip.state_dict()) - set(plain.state_dict())
    assert set(plain.state_dict()) < set(skip.state_dict()) and all(k.startswith("to_rgb.") for k in extra)


def test_minibatch_std_appends_the_group_std():
    from src.models import minibatch_std

    x = torch.randn(8, 5, 4, 4)
    out = minibatch_std(x, 4)
    assert out.shape == (8, 6, 4, 4) and torch.equal(out[:, :5], x)
    groups = x.view(4, 2, 5, 4, 4)  # interleaved: image i is in group i % 2
    expected = groups.var(dim=0, unbiased=False).add(1e-8).sqrt().mean(dim=(1, 2, 3))
    torch.testing.assert_close(out[:, 5, 0, 0], expected.repeat(4))
    assert minibatch_std(torch.randn(6, 2, 4, 4), 4).shape == (6, 3, 4, 4)  # 6 is not a multiple of 4: groups of 3
    identical = minibatch_std(torch.ones(4, 2, 4, 4), 4)[:, 2]
    assert identical.max() < 1e-3  # no variety, no std: what D uses to spot a collapsed G


def test_minibatch_std_option_reaches_d_and_changes_its_head():
    torch.manual_seed(0)
    _, disc = small_model(minibatch_std=4)
    head = disc.pipe[-1]
    assert disc.minibatch_std == 4 and head.in_channels == 4 * 8 + 1
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    assert disc(x).shape == (4,)
    disc.eval()  # BN on running statistics: only the std channel can couple the images of a batch
    with torch.no_grad():  # the head reads the std channel alone, as a trained D could
        head.weight.zero_()
        head.weight[:, -1] = 1.0
        head.bias.zero_()
    logits = disc(x)
    assert torch.allclose(logits, logits[:1].expand(4)) and logits[0] > 0  # one group: one std, one logit
    changed = x.clone()
    changed[1] = -changed[1]
    assert not torch.allclose(disc(x)[0], disc(changed)[0])  # image 0's logit moves with image 1


def test_r1_drops_batch_norm_from_d():
    params = parse_params({"train": {"r1_gamma": 1.0}})
    assert model_kwargs(params)["discriminator"]["batch_norm"] is False
    assert not any(isinstance(m, nn.BatchNorm2d) for m in build_models(params)[1].modules())


def test_conditional_models_use_the_game_label():
    params = parse_params({"model": {"latent_dim": 8, "gen_filters": 4, "disc_filters": 4, "conditional": True,
                                     "palette_size": 0}})
    assert model_kwargs(params)["generator"]["num_classes"] == len(params.collect.games) == 3
    gen, disc = build_models(params)
    gen.eval()
    z = torch.randn(6, 8, 1, 1)
    pong, breakout = gen(z, torch.full((6,), 2)), gen(z, torch.zeros(6, dtype=torch.long))
    assert pong.shape == (6, 3, 64, 64) and not torch.allclose(pong, breakout)
    assert torch.equal(gen(z), gen(z, mix_labels(6, gen.class_freq)))  # no labels: the training mix
    with torch.no_grad():
        disc.embed.weight.normal_()  # a trained projection: the label now moves the logit
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    assert not torch.allclose(disc(x, torch.zeros(4, dtype=torch.long)), disc(x, torch.ones(4, dtype=torch.long)))
    with pytest.raises(ValueError, match="class-conditional: pass the game labels"):
        disc(x)


def test_mix_labels_follow_the_proportions_in_every_prefix():
    freq = torch.tensor([0.5, 0.2, 0.3])
    labels = mix_labels(1000, freq)
    assert torch.equal(labels, mix_labels(1000, freq))  # no randomness
    assert torch.bincount(labels, minlength=3).tolist() == pytest.approx([500, 200, 300], abs=2)
    assert sorted(set(mix_labels(8, freq).tolist())) == [0, 1, 2]  # a small grid shows every game


def test_unconditional_models_have_no_label_parts():
    gen, disc = build_models(parse_params({}))
    assert gen.num_classes == 0 and disc.embed is None and not hasattr(gen, "class_freq")


# DiffAugment --------------------------------------------------------------------------------


def test_diff_augment_shapes_randomness_and_identity():
    x = torch.rand(6, 3, 64, 64) * 2 - 1
    assert diff_augment(x, "") is x
    gen = torch.Generator().manual_seed(0)
    for name in AUGMENT_FNS:
        y = diff_augment(x, name, gen)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert not torch.equal(y, x)
    a = diff_augment(x, "color,translation,cutout", torch.Generator().manual_seed(1))
    b = diff_augment(x, "color,translation,cutout", torch.Generator().manual_seed(1))
    assert torch.equal(a, b)  # reproducible from the generator's state


def test_diff_augment_translation_and_cutout_do_what_they_say():
    x = torch.ones(64, 3, 32, 32)
    cut = diff_augment(x, "cutout", torch.Generator().manual_seed(0))
    zero_fraction = (cut == 0).float().mean(dim=(1, 2, 3))
    assert torch.all(zero_fraction > 0) and torch.all(zero_fraction <= 0.25 + 1e-6)  # one square, half the side
    moved = diff_augment(x, "translation", torch.Generator().manual_seed(0))
    assert set(moved.unique().tolist()) <= {0.0, 1.0}  # pixels are moved or padded, never blended
    assert (moved == 0).any()


def test_diff_augment_is_differentiable():
    x = (torch.rand(4, 3, 64, 64) * 2 - 1).requires_grad_(True)
    y = diff_augment(x, "color,translation,cutout", torch.Generator().manual_seed(0))
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError, match="allowed: color, translation, cutout"):
        parse_policy("color,blur")


# Palette output -----------------------------------------------------------------------------


def test_palette_of_takes_the_commonest_colours_deterministically():
    frames = np.zeros((4, 3, 8, 8), np.uint8)
    frames[:, 0, :, :4] = 200  # (200, 0, 0) on half the pixels
    frames[:, 2, :2, 4:] = 100  # (0, 0, 100) on a quarter; (0, 0, 0) on the rest
    palette = palette_of(frames, 4, every=1)
    rgb = ((palette + 1) * 127.5).round().int().tolist()
    assert rgb == [[200, 0, 0], [0, 0, 0], [0, 0, 100], [0, 0, 100]]  # padded with the last colour
    assert palette.min() >= -1 and palette.max() <= 1


def test_palette_generator_draws_only_palette_colours_and_trains_on_raw_output():
    params = parse_params({"model": {"latent_dim": 8, "gen_filters": 4, "palette_size": 5}})
    gen, _ = build_models(params)
    colours = torch.tensor([[-1.0, -1, -1], [1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]])
    gen.palette.copy_(colours)
    z = torch.randn(3, 8, 1, 1)
    gen.eval()
    pixels = gen(z).permute(0, 2, 3, 1).reshape(-1, 3)
    assert (pixels[:, None, :] == colours[None]).all(dim=2).any(dim=1).all()
    gen.train()
    raw = gen(z)
    assert not (raw.detach().permute(0, 2, 3, 1).reshape(-1, 3)[:, None, :] == colours[None]).all(dim=2).any(dim=1).all()
    raw.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters())


@pytest.mark.parametrize("skip_rgb", [False, True])
def test_palette_head_paints_softmax_mixes_of_the_palette(skip_rgb):
    params = parse_params({"model": {"latent_dim": 8, "gen_filters": 4, "palette_size": 5, "palette_head": "soft",
                                     "skip_rgb": skip_rgb}})
    gen, _ = build_models(params)
    colours = torch.tensor([[-1.0, -1, -1], [1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -0.5, 0.25]])
    gen.palette.copy_(colours)
    z = torch.randn(3, 8, 1, 1)
    gen.train()
    raw = gen(z)
    raw.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters())
    # Every raw pixel is a convex mix: inside the palette's colour box, and not already snapped.
    pixels = raw.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    assert (pixels >= colours.min(0).values - 1e-6).all() and (pixels <= colours.max(0).values + 1e-6).all()
    assert not (pixels[:, None, :] == colours[None]).all(dim=2).any(dim=1).all()
    # With the logit layers silenced, the mix is the plain mean colour; one dominant logit paints that colour.
    last_layers = [gen.pipe[-2], *(gen.to_rgb.values() if skip_rgb else [])]
    with torch.no_grad():
        for layer in last_layers:
            layer.weight.zero_()
            layer.bias.zero_()
        assert torch.allclose(gen(z), colours.mean(0).view(1, 3, 1, 1).expand(3, 3, 64, 64), atol=1e-6)
        gen.pipe[-2].bias[4] = 50.0
        assert torch.allclose(gen(z), colours[4].view(1, 3, 1, 1).expand(3, 3, 64, 64), atol=1e-6)
    gen.eval()
    drawn = gen(z).permute(0, 2, 3, 1).reshape(-1, 3)
    assert (drawn[:, None, :] == colours[None]).all(dim=2).any(dim=1).all()


def test_palette_head_needs_a_palette():
    with pytest.raises(ParamsError, match="palette_head: soft needs a palette to paint from; palette_size is 0"):
        parse_params({"model": {"palette_head": "soft", "palette_size": 0}})
    with pytest.raises(ValueError, match="palette_head needs a palette of 2 or more colours"):
        Generator(palette_head="hard", palette_size=0)
    assert build_models(parse_params({"model": {"palette_size": 16}}))[0].palette_head == "none"


@pytest.mark.parametrize("skip_rgb", [False, True])
def test_hard_palette_head_paints_palette_colours_with_the_soft_gradient(skip_rgb):
    model = {"latent_dim": 8, "gen_filters": 4, "palette_size": 5, "skip_rgb": skip_rgb}
    torch.manual_seed(0)
    soft, _ = build_models(parse_params({"model": {**model, "palette_head": "soft"}}))
    hard, _ = build_models(parse_params({"model": {**model, "palette_head": "hard"}}))
    hard.load_state_dict(soft.state_dict())
    colours = torch.tensor([[-1.0, -1, -1], [1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -0.5, 0.25]])
    soft.palette.copy_(colours)
    hard.palette.copy_(colours)
    z = torch.randn(3, 8, 1, 1)
    painted = hard(z)
    pixels = painted.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    assert (pixels[:, None, :] == colours[None]).all(dim=2).any(dim=1).all()  # already palette colours in training
    # Straight-through: a loss linear in the image gives the hard head exactly the soft head's gradients.
    weights = torch.randn(3, 3, 64, 64)
    (painted * weights).sum().backward()
    (soft(z) * weights).sum().backward()
    for a, b in zip(hard.parameters(), soft.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-7)
    # evaluate's raw drawing (snap off) is the head's own painting, in eval mode as in training.
    hard.eval()
    with Drawn(hard, None) as raw:
        assert torch.equal(raw(z), hard(z))


def test_snap_to_palette_picks_the_nearest_colour():
    palette = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    x = torch.tensor([0.2, 0.7, -0.4]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    assert torch.equal(snap_to_palette(x, palette), torch.zeros(1, 3, 2, 2))
    assert torch.equal(snap_to_palette(x + 0.5, palette), torch.ones(1, 3, 2, 2))


def test_palette_size_of_one_is_refused_and_zero_turns_the_palette_off():
    with pytest.raises(ParamsError, match="model.palette_size = 1: a palette of 1 colour.*use 0 \\(off\\) or 2..256"):
        parse_params({"model": {"palette_size": 1}})
    assert build_models(parse_params({}))[0].palette.shape == (16, 3)
    gen, _ = build_models(parse_params({"model": {"palette_size": 0}}))
    assert gen.palette_size == 0 and not hasattr(gen, "palette")
