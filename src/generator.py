"""A trained generator file: which one to use, loading it, drawing images from it, writing them as PNGs.

Every stage that needs a saved generator (train's outputs, evaluate, FID during training, the
`src.sample` CLI) comes here. The same seed gives the same images on any device and at any batch
size: the noise is drawn on the CPU, once, from the seed.
"""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from src.atomic import ForeignOutputError, replacing, replacing_dir
from src.data import to_uint8
from src.errors import UserError
from src.memory import check_fits
from src.models import Generator, mix_labels
from src.params import IMAGE_SHAPE
from src.paths import MODELS_DIR


class GeneratorFileError(UserError):
    pass


# Which generator is judged and drawn from, in order of preference.
GENERATOR_FILES = ("generator_best.pt", "generator_ema.pt", "generator.pt")
GRID_SIZE = 64  # images per logged or written sample grid


def pick_generator(models_dir: Path = MODELS_DIR) -> Path:
    """The generator `evaluate` scores and `src.sample` draws from: best step, else EMA, else the last."""
    for name in GENERATOR_FILES:
        path = Path(models_dir) / name
        if path.is_file():
            return path
    raise GeneratorFileError(
        f"no generator in {models_dir}/ (looked for {', '.join(GENERATOR_FILES)}); "
        "train one first: `dvc repro train` (or `python -m src.train`)"
    )


def load_generator(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """A generator file written by `src.train` -> (generator in eval mode on `device`, its metadata)."""
    path = Path(path)
    fix = "run `dvc repro train` (or `python -m src.train`) to write it (src.sample: or name another with --model)"
    if not path.is_file():
        raise GeneratorFileError(f"no generator at {path}; {fix}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own text here suggests weights_only=False, which would let the file run code.
        reason = "not a torch file of tensors and plain data"
        raise GeneratorFileError(f"{path} is not a readable generator file ({reason}); {fix}") from None
    except Exception as exc:
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
        raise GeneratorFileError(f"{path} is not a readable generator file ({reason}); {fix}") from None
    if not isinstance(payload, dict) or payload.get("kind") != "generator" or "state_dict" not in payload:
        raise GeneratorFileError(f"{path} is not a generator written by src.train; {fix}")
    if tuple(payload.get("image_shape", ())) != IMAGE_SHAPE:
        raise GeneratorFileError(
            f"{path} draws images of shape {payload.get('image_shape')}, this code expects {list(IMAGE_SHAPE)}; {fix}"
        )
    try:
        generator = Generator(**payload["model"])
        generator.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise GeneratorFileError(f"{path} does not match the Generator architecture ({exc}); {fix}") from None
    generator.to(device).eval()
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    return generator, meta


def check_can_draw(n: int, latent_dim: int = 0) -> None:
    """Refuse, before allocating, `n` images (uint8) and their noise vectors that this machine cannot hold."""
    image_bytes = math.prod(IMAGE_SHAPE) + 4 * latent_dim
    check_fits(n * image_bytes, f"{n:,} images of {image_bytes:,} B",
               "draw fewer (src.sample --n; evaluate.num_samples, train.fid_samples or tune.fid_samples)")


@torch.no_grad()
def generate_images(
    generator: nn.Module,
    n: int,
    *,
    latent_dim: int,
    seed: int,
    device: str | torch.device,
    batch_size: int = 256,
    game: int | None = None,
) -> torch.Tensor:
    """`n` images as a uint8 (n, 3, 64, 64) CPU tensor; the same for the same seed and weights.

    A class-conditional generator draws the training mix of games (`mix_labels`), or only the game
    with index `game`.
    """
    check_can_draw(n, latent_dim)
    noise = torch.randn(n, latent_dim, 1, 1, generator=torch.Generator().manual_seed(seed))
    if getattr(generator, "num_classes", 0):
        labels = requested_labels(generator, n, game)
        pairs = zip(noise.split(batch_size), labels.split(batch_size))
        chunks = [to_uint8(generator(z.to(device), y.to(device))).cpu() for z, y in pairs]
    else:
        if game is not None:
            raise UserError("this generator was not trained class-conditional (model.conditional: false); "
                            "it cannot draw one chosen game")
        chunks = [to_uint8(generator(z.to(device))).cpu() for z in noise.split(batch_size)]
    return torch.cat(chunks) if chunks else torch.empty(0, *IMAGE_SHAPE, dtype=torch.uint8)


def requested_labels(generator: nn.Module, n: int, game: int | None = None) -> torch.Tensor:
    """The game labels `generate_images` asks a class-conditional generator for, in order: the training
    mix (`mix_labels`), or only the game with index `game`."""
    return mix_labels(n, generator.class_freq.cpu()) if game is None else torch.full((n,), game)


def game_index(meta: dict[str, Any], game: str) -> int:
    """The label of `game` in a conditional generator file's metadata, or a clear error."""
    games = list(meta.get("params", {}).get("collect.games", []))
    if meta.get("model", {}).get("num_classes", 0) == 0:
        raise UserError("--game needs a generator trained with model.conditional: true")
    if game not in games:
        raise UserError(f"--game {game!r}: this generator knows {', '.join(games)}")
    return games.index(game)


# What marks an output as written here, so that a later run may replace it (and nothing else):
SAMPLES_MARKER = ".atari-gan-samples"  # a file in every folder `write_folder` writes
GRID_TEXT = ("Software", "atari-gan")  # a PNG text chunk in every grid `write_grid` writes


def write_png(image: torch.Tensor, path: Path, text: tuple[str, str] | None = None) -> None:
    """A uint8 (3, H, W) tensor as a PNG file, pixel values unchanged; `text` is a (key, value) chunk."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if text is not None:
        info.add_text(*text)
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(path, format="PNG", pnginfo=info)


def check_grid_out(out: Path, what: str = "") -> None:
    """Refuse a grid path that holds anything but a grid written here (any other file is left alone)."""
    from PIL import Image

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ForeignOutputError(f"{what}{out}: a grid is a PNG file; give a name ending in .png")
    if not out.exists() and not out.is_symlink():
        return
    ours = False
    if out.is_file() and not out.is_symlink():
        try:
            with Image.open(out) as image:
                ours = image.format == "PNG" and image.info.get(GRID_TEXT[0]) == GRID_TEXT[1]
        except (OSError, ValueError):
            ours = False
    if not ours:
        raise ForeignOutputError(f"{what}{out} exists and is not a grid this command wrote; it is left alone: "
                                 "choose another name")


def write_grid(images: torch.Tensor, out: Path, nrow: int = 8) -> Path:
    """One PNG of all `images` (uint8) in a grid, written atomically."""
    from torchvision.utils import make_grid

    out = Path(out)
    with replacing(out, suffix=".png") as tmp:
        write_png(make_grid(images, nrow=nrow, padding=2), tmp, text=GRID_TEXT)
    return out


def write_folder(images: torch.Tensor, out: Path) -> Path:
    """One PNG per image (0000.png, ...) in folder `out`, which is replaced as a whole; a folder `out`
    that holds anything but this writer's own earlier output (its SAMPLES_MARKER) is refused."""
    out = Path(out)
    with replacing_dir(out, marker=SAMPLES_MARKER) as tmp:
        width = max(4, len(str(len(images) - 1)))
        for i, image in enumerate(images):
            write_png(image, tmp / f"{i:0{width}d}.png")
    return out
