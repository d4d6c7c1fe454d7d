"""The scale of precision/recall and density/coverage on the study snapshot: the metrics at several k (issue 27).

Training frames scored against the holdout in place of generated screens give the top of each metric's scale
(what a perfect generator would reach); the study's generators give where recipes land on it. A k whose real
row is near 1 and whose generated rows differ is a usable scale; at k = 3 (evaluate's precision/recall) on
these near-duplicate-heavy screens the real precision is itself far below 1.

    python benchmarks/prc_scale.py [RUN.generator.pt ...] [--k 3 5 10 20 50 100] [--drawing raw] [--write]

Generators are `quality_study.py run` files (`<run>.generator.pt`). Each is drawn as evaluate draws it: 2,048
screens from the "evaluate" latent stream of its seed, raw and snapped to the 16-colour palette; their Inception
features are cached beside it (`<run>.features.pt`, git-ignored like the generator). The real features come from
the study's cache (data/study/features), 2,048 training frames against 2,048 holdout frames as in evaluate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.quality_study import FEATURE_CACHE, STUDY_SNAPSHOT  # noqa: E402
from benchmarks.results_md import machine, write_block  # noqa: E402
from src import fid  # noqa: E402
from src.quality_metrics import density_coverage, precision_recall  # noqa: E402

SAMPLES = 2048
PALETTE = 16
DEFAULT_K = (3, 5, 10, 20, 50, 100)


def scores_at(fake: torch.Tensor, real: torch.Tensor, k: int) -> dict[str, float]:
    """Precision/recall and density/coverage of `fake` against `real` at one k, as evaluate computes them."""
    return {**precision_recall(fake, real, k=k), **density_coverage(fake, real, k=k)}


def generated_features(path: Path, extractor, snapshot, drawings: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Features of a study generator's evaluate screens (`drawings`: raw, palette), cached beside the file."""
    from src.evaluate import generate
    from src.models import build_models, palette_of, snap_images
    from src.params import Params, effective

    cache = path.with_name(path.name.removesuffix(".generator.pt") + ".features.pt")
    features = torch.load(cache, weights_only=True) if cache.is_file() else {}
    if all(d in features for d in drawings):
        return {d: features[d] for d in drawings}
    payload = torch.load(path, map_location="cpu", weights_only=False)
    params = effective(Params.model_validate(payload["params"]))
    generator, _ = build_models(params)
    generator.load_state_dict(payload["state_dict"])
    screens = generate(generator, SAMPLES, latent_dim=params.model.latent_dim,
                       seed=fid.latent_seed(params.seed, "evaluate"), device=torch.device("cpu"), batch_size=100)
    for drawing in drawings:
        if drawing not in features:
            drawn = screens if drawing == "raw" else snap_images(screens, palette_of(snapshot.train_images, PALETTE))
            features[drawing] = extractor(drawn, desc=f"{path.name} {drawing}")
    torch.save(features, cache)
    return {d: features[d] for d in drawings}


def table(sets: dict[str, torch.Tensor], real: torch.Tensor, ks: list[int]) -> str:
    """One row per set and k: precision, recall, density, coverage against `real`."""
    lines = ["| set | k | precision | recall | density | coverage |", "|---|---:|---:|---:|---:|---:|"]
    for name, features in sets.items():
        for k in ks:
            s = scores_at(features, real, k)
            lines.append(f"| {name} | {k} | {s['precision']:.3f} | {s['recall']:.3f} | {s['density']:.3f} | "
                         f"{s['coverage']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("generators", nargs="*", type=Path, help="quality_study.py <run>.generator.pt files")
    parser.add_argument("--k", type=int, nargs="+", default=list(DEFAULT_K))
    parser.add_argument("--drawing", choices=["raw", "palette", "both"], default="both")
    parser.add_argument("--write", action="store_true", help="also write the table into benchmarks/RESULTS.md")
    args = parser.parse_args(argv)

    from src.data import load_snapshot
    from src.inception import InceptionFeatures, resolve_inception_weights

    snapshot = load_snapshot(STUDY_SNAPSHOT)
    extractor = InceptionFeatures(resolve_inception_weights(None), device=torch.device("cpu"), batch_size=100)
    holdout = fid.real_features(extractor, snapshot, "holdout", cache_dir=FEATURE_CACHE)
    index = fid.real_selection(len(holdout), SAMPLES)
    real = holdout if index is None else holdout[torch.from_numpy(index)]
    sets = {"training frames (the top of the scale)": fid.real_features(extractor, snapshot, "train", count=SAMPLES,
                                                                        cache_dir=FEATURE_CACHE)}
    for path in args.generators:
        drawings = ("raw", "palette") if args.drawing == "both" else (args.drawing,)
        for drawing, features in generated_features(path, extractor, snapshot, drawings).items():
            sets[f"{path.name.removesuffix('.generator.pt')}, {drawing}"] = features
    text = table(sets, real, args.k) + f"\n\n{machine()} · {SAMPLES} of each against {len(real)} holdout frames"
    print(text)
    if args.write:
        write_block("prc-scale", text)


if __name__ == "__main__":
    main()
