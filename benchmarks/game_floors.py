"""Each game's FID floor on the study snapshot, raw and with the palette: the yardstick of per-game FIDs (issue 27).

A game's floor is what a perfect generator would score for it at the study's counts: that game's training frames
among 2,048 (the same subset evaluate scores as `fid_holdout_vs_train`) against that game's holdout frames. Snapped
to the 16-colour palette they give the floor of the game's palette FID (evaluate's `fid_game_floor_palette/*`; runs
scored before 2026-12-05 carry the raw floors only, and these do not depend on the generator).

    python benchmarks/game_floors.py [--write]

Real features come from the study's cache (data/study/features), computed there if missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.quality_study import FEATURE_CACHE, STUDY_SNAPSHOT  # noqa: E402
from benchmarks.results_md import machine, write_block  # noqa: E402
from src import fid  # noqa: E402

SAMPLES = 2048
PALETTE = 16


def table(games: list[str], counts: dict[str, tuple[int, int]], overall: tuple[float, float],
          raw: dict[str, float | None], palette: dict[str, float | None]) -> str:
    """Markdown rows: all games, then each game's raw and palette floor with its frame counts."""
    fmt = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
    lines = ["| frames | training / holdout frames | floor raw | floor palette | 3× palette floor |",
             "|---|---:|---:|---:|---:|",
             f"| all games | {SAMPLES:,} / {sum(h for _, h in counts.values()):,} | {overall[0]:.1f} | "
             f"{overall[1]:.1f} | – |"]
    for game in games:
        train_n, holdout_n = counts[game]
        lines.append(f"| {game} | {train_n:,} / {holdout_n:,} | {fmt(raw[game])} | {fmt(palette[game])} | "
                     f"{fmt(None if palette[game] is None else 3 * palette[game])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="also write the table into benchmarks/RESULTS.md")
    args = parser.parse_args(argv)

    from src.data import load_snapshot
    from src.evaluate import game_floors, train_subset_labels
    from src.inception import InceptionFeatures, resolve_inception_weights
    from src.models import palette_of

    snapshot = load_snapshot(STUDY_SNAPSHOT)
    extractor = InceptionFeatures(resolve_inception_weights(None), device=torch.device("cpu"), batch_size=100)
    holdout = fid.real_features(extractor, snapshot, "holdout", cache_dir=FEATURE_CACHE)
    train = fid.real_features(extractor, snapshot, "train", count=SAMPLES, cache_dir=FEATURE_CACHE)
    snapped = fid.real_features(extractor, snapshot, "train", count=SAMPLES, cache_dir=FEATURE_CACHE,
                                palette=palette_of(snapshot.train_images, PALETTE))
    train_labels = train_subset_labels(snapshot, SAMPLES)
    holdout_labels = np.asarray(snapshot.holdout_labels)
    games = list(snapshot.games)
    common = dict(games=games, holdout=holdout, holdout_labels=holdout_labels, train_labels=train_labels)
    counts = {g: (int((train_labels == i).sum()), int((holdout_labels == i).sum())) for i, g in enumerate(games)}
    overall = (fid.fid_from_features(holdout, train), fid.fid_from_features(holdout, snapped))
    text = (table(games, counts, overall, game_floors(train=train, **common), game_floors(train=snapped, **common))
            + f"\n\n{machine()} · the study snapshot ({snapshot.sha256[:12]}), {PALETTE}-colour palette")
    print(text)
    if args.write:
        write_block("game-floors", text)


if __name__ == "__main__":
    main()
