"""`python -m src.sample`: draw images from a trained generator (the pieces live in src/generator.py).

`python -m src.sample --n 64 --out samples.png --grid` writes one grid image;
`python -m src.sample --n 500 --out samples/` writes a folder of PNGs (0000.png, ...).
`--game Pong-v4` draws one game (generators trained with `model.conditional: true`).
`--model` defaults to the generator `evaluate` scores (best step, else EMA, else last), and the
command says which file it drew from.
The same seed gives the same images on any device and at any batch size.

Nothing it did not write is replaced: an existing --out folder must be empty or one this command
wrote (it holds the `.atari-gan-samples` marker), an existing grid must be a grid it drew (its PNG
says so); nothing is written inside data/snapshot/, models/, checkpoints/, metrics/, plots/, .dvc/, .git/ or
mlruns/ (src/paths.py: STAGE_FOLDERS), nor over the project folder itself.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from src.atomic import ForeignOutputError, check_can_create, check_replaceable
from src.device import resolve_device
from src.errors import UserError, run_cli, stage_parser
from src.generator import (
    SAMPLES_MARKER,
    check_grid_out,
    game_index,
    generate_images,
    load_generator,
    pick_generator,
    write_folder,
    write_grid,
)
from src.lock import project_lock
from src.params import check_device
from src.paths import stage_folder_holding


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = stage_parser("python -m src.sample", __doc__)
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


def check_out(out: Path, grid: bool) -> None:
    """Refuse an --out before any work: one that holds what this command did not write (a grid it did not
    draw; a folder without its marker: the project itself), one inside a folder the stages write, or one that
    cannot be written (under a file, in a read-only place)."""
    out = Path(out)
    if grid:
        check_grid_out(out, what="--out ")
    else:
        check_replaceable(out, SAMPLES_MARKER, what="--out ")
    folder = stage_folder_holding(out)
    if folder is not None:
        raise ForeignOutputError(f"--out {out} is inside {folder}/, which the pipeline (or DVC, git, MLflow) "
                                 "writes; nothing is written there: choose a path outside it, e.g. --out samples.png")
    check_can_create(out, what="--out ")


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
    check_out(args.out, args.grid)
    inside = Path.cwd().resolve() in Path(args.out).resolve().parents
    with project_lock() if inside else contextlib.nullcontext():  # into this project: one writer at a time
        device = resolve_device(args.device, key="--device")
        model = args.model or pick_generator()
        generator, meta = load_generator(model, device)
        game = None if args.game is None else game_index(meta, args.game)
        images = generate_images(generator, args.n, latent_dim=meta["latent_dim"], seed=args.seed, device=device,
                                 batch_size=args.batch_size, game=game)
        # The OS may still refuse the write (read-only, disk full): atomic's OutputWriteError says so.
        out = write_grid(images, args.out, args.nrow) if args.grid else write_folder(images, args.out)
    print(f"wrote {args.n} images from {model} to {out}")
    return out


if __name__ == "__main__":
    run_cli(main)
