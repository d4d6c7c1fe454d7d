"""GPU checks of the captured training step (`train.cuda_graphs`) against the eager one.

Each check trains the default recipe for `--steps` steps on the study snapshot, captured and eager. Its lazy
R1 (`train.r1_every: 16`) makes two kinds of step, each captured as its own graph: the plain one at step 4,
the R1 one at step 48 (after 3 eager warm-ups of each kind), so the default 100 steps replay both; the log
line "training step: ..." says which path each run takes.
- the default recipe, bf16: captured vs eager losses and the largest G weight difference;
- `train.lr_decay: linear`: the captured step must follow the decaying learning rate (a float lr would be
  baked into the graph): its losses track the eager decayed run's, not those of a run without decay;
- DiffAugment `color,translation,cutout` and `model.conditional: true` must capture and train.
It prints the D-loss means every 10 steps of each run. On a CPU (`--device cpu`) both runs are eager.

    python benchmarks/cuda_graph_checks.py [--device cuda] [--steps 100]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.quality_study import STUDY_SNAPSHOT, with_overrides  # noqa: E402
from src.data import load_snapshot  # noqa: E402
from src.params import load_params  # noqa: E402
from src.generator import generate_images  # noqa: E402
from src.training import TrainResult, train_gan  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="  %(message)s")
    snapshot = load_snapshot(STUDY_SNAPSHOT, verify=False)
    base = load_params()

    def run(**overrides: object) -> TrainResult:
        params = with_overrides(base, {"train.device": args.device, "train.iterations": args.steps, "train.fid_every": 0,
                                       "train.log_every": 10, "train.checkpoint_every": 10**6,
                                       "train.image_every": 10**6, **overrides})
        started = time.time()
        result = train_gan(params, snapshot, checkpoint_dir=None, progress=False)
        print(f"  {overrides}: {time.time() - started:.1f} s, loss_d {[round(h['loss_d'], 4) for h in result.loss_history]}")
        return result

    def max_diff(a: TrainResult, b: TrainResult) -> float:
        sa, sb = a.generator.state_dict(), b.generator.state_dict()
        return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa if sa[k].is_floating_point())

    print("default recipe (lazy R1, two graphs), bf16:")
    graphed = run(**{"train.cuda_graphs": True})
    eager = run(**{"train.cuda_graphs": False})
    print(f"  max |G weight difference|: captured vs eager {max_diff(graphed, eager):.2e}")
    print("lr_decay linear, fp32:")
    graphed = run(**{"train.precision": "fp32", "train.lr_decay": "linear", "train.cuda_graphs": True})
    eager = run(**{"train.precision": "fp32", "train.lr_decay": "linear", "train.cuda_graphs": False})
    no_decay = run(**{"train.precision": "fp32", "train.lr_decay": "none", "train.cuda_graphs": True})
    print(f"  max |G weight difference|: captured vs eager {max_diff(graphed, eager):.2e}, "
          f"captured with vs without decay {max_diff(graphed, no_decay):.2e}")
    print("augment color,translation,cutout, fp32:")
    for graphs in (True, False):
        run(**{"train.precision": "fp32", "train.augment": "color,translation,cutout", "train.cuda_graphs": graphs})
    print("model.conditional:")
    conditional = run(**{"model.conditional": True, "train.cuda_graphs": True})
    run(**{"model.conditional": True, "train.cuda_graphs": False})
    pong = generate_images(conditional.generator, 8, latent_dim=base.model.latent_dim, seed=0, device=args.device, game=2)
    print(f"  drew {tuple(pong.shape)} {pong.dtype} of game 2")
    if args.device.startswith("cuda"):
        print(torch.cuda.get_device_name())


if __name__ == "__main__":
    main()
