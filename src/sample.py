"""`python -m src.sample`: draw images from a trained generator (the pieces live in src/generator.py).

`python -m src.sample --n 64 --out samples.png --grid` writes one grid image;
`python -m src.sample --n 500 --out samples/` writes a folder of PNGs (0000.png, ...).
`--game Pong-v4` draws one game (generators trained with `model.conditional: true`).
`--model` defaults to the generator `evaluate` scores (best step, else EMA, else last), and the
command says which file it drew from.
The same seed gives the same images on any device and at any batch size.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from src.device import resolve_device
from src.errors import UserError, run_cli
from src.generator import game_index, generate_images, load_generator, pick_generator, write_folder, write_grid
from src.params import check_device


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
    model = args.model or pick_generator()
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
