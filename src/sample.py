"""Draw images from a trained generator: the loader and sampler other stages use, and a CLI.

`python -m src.sample --n 64 --out samples.png --grid` writes one grid image;
`python -m src.sample --n 500 --out samples/` writes a folder of PNGs (0000.png, ...).
`--game Pong-v4` draws one game (generators trained with `model.conditional: true`).
`--model` defaults to the generator `evaluate` scores (best step, else EMA, else last), and the
command says which file it drew from.
The same seed gives the same images on any device and at any batch size: the noise is drawn
on the CPU, once, from the seed.
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from src.atomic import replacing, replacing_dir
from src.data import to_uint8
from src.device import resolve_device
from src.errors import UserError, run_cli
from src.models import Generator, mix_labels
from src.params import IMAGE_SHAPE, check_device
from src.paths import MODELS_DIR


class GeneratorFileError(UserError):
    pass


def default_model_path(models_dir: Path = MODELS_DIR) -> Path:
    """The generator `evaluate` scores, so samples show what the metrics measured."""
    from src.evaluate import pick_generator

    return pick_generator(Path(models_dir))


def load_generator(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """A generator file written by `src.train` -> (generator in eval mode on `device`, its metadata)."""
    path = Path(path)
    fix = "run `dvc repro train` (or `python -m src.train`) to write it, or pass --model"
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


def write_png(image: torch.Tensor, path: Path) -> None:
    """A uint8 (3, H, W) tensor as a PNG file, pixel values unchanged."""
    from PIL import Image

    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(path, format="PNG")


def write_grid(images: torch.Tensor, out: Path, nrow: int = 8) -> Path:
    """One PNG of all `images` (uint8) in a grid, written atomically."""
    from torchvision.utils import make_grid

    out = Path(out)
    with replacing(out, suffix=".png") as tmp:
        write_png(make_grid(images, nrow=nrow, padding=2), tmp)
    return out


def write_folder(images: torch.Tensor, out: Path) -> Path:
    """One PNG per image (0000.png, ...) in folder `out`, which is replaced as a whole."""
    out = Path(out)
    with replacing_dir(out) as tmp:
        width = max(4, len(str(len(images) - 1)))
        for i, image in enumerate(images):
            write_png(image, tmp / f"{i:0{width}d}.png")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m src.sample", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    parser.add_argument("--out", type=Path, required=True, help="a .png file with --grid, else a folder")
    parser.add_argument("--grid", action="store_true", help="write one grid image instead of a folder")
    parser.add_argument("--nrow", type=int, default=8, help="images per grid row (default 8)")
    parser.add_argument("--model", type=Path, default=None,
                        help="generator file (default: the one `evaluate` scores: best, else EMA, else last)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--game", default=None, help="only this game, e.g. Pong-v4 (class-conditional generators)")
    return parser.parse_args(argv)


def check_out(out: Path) -> None:
    """Refuse an --out that cannot be written before any work: under a file, or in a read-only place."""
    out = Path(out)
    if out.exists() and not os.access(out, os.W_OK):
        raise UserError(f"--out {out}: not writable (permission denied); choose another --out")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"--out {out}: {parent} is a file, not a folder; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: cannot write in {parent} (permission denied); choose another --out")


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    if args.n < 1 or args.batch_size < 1 or args.nrow < 1:
        raise UserError("--n, --batch-size and --nrow must be at least 1")
    if not args.grid and args.out.suffix.lower() == ".png":
        raise UserError(f"--out {args.out} looks like a file: add --grid for one grid image, or give a folder")
    try:
        check_device(args.device)
    except ValueError as exc:
        raise UserError(f"--device: {exc}") from None
    check_out(args.out)
    device = resolve_device(args.device, key="--device")
    model = args.model or default_model_path()
    generator, meta = load_generator(model, device)
    game = None if args.game is None else game_index(meta, args.game)
    images = generate_images(generator, args.n, latent_dim=meta["latent_dim"], seed=args.seed, device=device,
                             batch_size=args.batch_size, game=game)
    try:
        out = write_grid(images, args.out, args.nrow) if args.grid else write_folder(images, args.out)
    except OSError as exc:  # e.g. a read-only file system, a full disk
        raise UserError(f"--out {args.out}: could not write ({exc.strerror or exc}); choose another --out") from None
    print(f"wrote {args.n} images from {model} to {out}")
    return out


if __name__ == "__main__":
    run_cli(main)
