"""FID of saved generators drawn with no palette and with palettes of several sizes (`model.palette_size`).

Each generator file (a quality-study `*.generator.pt`) draws `--samples` screens from its own seed's noise;
they are snapped to the study snapshot's commonest colours after the fact and scored against 2,048 training
frames (what choosing a size may use) and against the holdout (what is reported).

    python benchmarks/palette_sweep.py benchmarks/quality/small-tuned-seed1.generator.pt [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.quality_study import STUDY_SNAPSHOT, with_overrides  # noqa: E402
from src import fid, inception  # noqa: E402
from src.atomic import write_json_atomic  # noqa: E402
from src.data import load_snapshot  # noqa: E402
from src.models import build_models, palette_of  # noqa: E402
from src.params import Params, effective  # noqa: E402
from src.generator import generate_images  # noqa: E402

SIZES = (0, 8, 16, 32, 64, 128)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("generators", nargs="+")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--inception-weights", default=None)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="palette sizes; 0 = none")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)

    snapshot = load_snapshot(STUDY_SNAPSHOT, verify=False)
    weights = inception.resolve_inception_weights(args.inception_weights)
    extractor = inception.InceptionFeatures(weights, device=args.device, batch_size=250)
    ref_train = fid.real_features(extractor, snapshot, "train", count=2048)
    ref_holdout = fid.real_features(extractor, snapshot, "holdout")
    palettes = {k: palette_of(snapshot.train_images, k).to(args.device) for k in args.sizes if k}
    rows = []
    for path in args.generators:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        # Files from before `model.palette_size` existed hold raw generators: size the palette by the weights.
        params = effective(with_overrides(Params.model_validate(saved["params"]),
                                          {"model.palette_size": len(saved["state_dict"].get("palette", ()))}))
        generator, _ = build_models(params)
        generator.load_state_dict(saved["state_dict"])
        generator.to(args.device).eval()
        for size in args.sizes:
            # The generator draws with this palette exactly as one trained with `model.palette_size: size`.
            generator.palette_size, generator.palette = size, palettes.get(size)
            images = generate_images(generator, args.samples, latent_dim=params.model.latent_dim,
                                     seed=fid.latent_seed(params.seed, "evaluate"), device=args.device)
            features = extractor(images, desc=f"palette {size}")
            row = {"generator": Path(path).name, "palette_size": size,
                   "fid_train": fid.fid_from_features(ref_train, features, args.device),
                   "fid_holdout": fid.fid_from_features(ref_holdout, features, args.device)}
            rows.append(row)
            print(f"{row['generator']:40s} palette {size:3d}: FID vs training frames {row['fid_train']:6.1f}, "
                  f"vs holdout {row['fid_holdout']:6.1f}", flush=True)
    if args.out:
        write_json_atomic(Path(args.out), rows)


if __name__ == "__main__":
    main()
