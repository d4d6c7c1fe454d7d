"""Training speed of params.yaml's default recipe and the article's recipe, side by side in one run.

Both run in our loop (`GANTrainer.step`, what `train_gan` runs, losses read every `train.log_every` steps) on
random frames held on the device: (a) `train.recipe: article` (width 64, batch 16, no R1, every step alike);
(b) params.yaml's top level - the `gpu` profile, what `profile: auto` trains on CUDA - (width 32, batch 32, lazy
R1 every `train.r1_every` steps, minibatch std, EMA). On CUDA both replay captured graphs (`train.cuda_graphs`),
the default one graph per kind of step; the table says which path each ran. Warm-up runs every step kind to its
capture; each timed window is a whole number of R1 periods, and windows of the two alternate (a, b, a, b, ...) so
a change in load hits both alike. Images/s counts real images drawn (batch x d_steps); iterations/s counts G
updates (each with d_steps D updates).

Floors (issue 25, one H100/H200): the default's images/s >= the article recipe's and >= 9,600 (4x the 2,300-2,550
the default made eagerly on an H200 at batch 32).

    python benchmarks/bench_recipes.py --device cuda [--write]     # the GPU measurement
    python benchmarks/bench_recipes.py --seconds 5 --threads 1     # a CPU check that it runs
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.bench_train import OurLoop, timed  # noqa: E402
from benchmarks.gpu_study import SECTION  # noqa: E402
from benchmarks.quality_study import with_overrides  # noqa: E402
from benchmarks.results_md import RESULTS_MD, machine, write_block  # noqa: E402
from src.device import resolve_device  # noqa: E402
from src.params import Params, load_params, with_profile  # noqa: E402
from src.training.step_graphs import step_kinds  # noqa: E402
from src.training.trainer import GANTrainer  # noqa: E402

RECIPES = {"article": {"train.recipe": "article"}, "default": {}}
FLOOR_IMAGES_S = 9_600


def recipe_params(base: Params, recipe: str, device: torch.device) -> Params:
    """The recipe as `dvc repro` trains it on a GPU: params.yaml's gpu profile, the recipe's overrides."""
    return with_overrides(with_profile(base, "gpu"), {**RECIPES[recipe], "train.device": str(device)})


def r1_period(trainer: GANTrainer) -> int:
    """Steps after which the pattern of step kinds repeats: r1_every with lazy R1, else 1."""
    t = trainer.t
    return t.r1_every if len(step_kinds(t.penalty_gamma, t.r1_every)) == 2 else 1


def warmup_steps(trainer: GANTrainer) -> int:
    """Steps until every kind of step has been captured and replayed once (on a CPU: a few eager steps)."""
    return (GANTrainer.GRAPH_WARMUP + 1) * r1_period(trainer) + 1 if trainer.graphed else 3


def window_iterations(seconds_per_it: float, window_s: float, trainer: GANTrainer) -> int:
    """Iterations of about `window_s` seconds, a whole number of R1 periods (each window has R1's share)."""
    period = r1_period(trainer)
    return period * max(1, round(window_s / seconds_per_it / period))


def path_label(trainer: GANTrainer) -> str:
    t = trainer.t
    if not trainer.graphed:
        return "eager"
    n = len(step_kinds(t.penalty_gamma, t.r1_every))
    return "2 CUDA graphs (plain, R1)" if n == 2 else "1 CUDA graph"


def measure(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    base = load_params()
    loops = {name: OurLoop(device, recipe_params(base, name, device), args.frames) for name in RECIPES}
    load_before = os.getloadavg()
    iters = {}
    for name, loop in loops.items():
        timed(loop, warmup_steps(loop.trainer), device)
        probe = r1_period(loop.trainer)
        iters[name] = window_iterations(timed(loop, probe, device) / probe, args.seconds / args.repeats, loop.trainer)
    rates: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(args.repeats):
        for name, loop in loops.items():
            rates[name].append(iters[name] / timed(loop, iters[name], device))
        print("  " + "   ".join(f"{n} {r[-1] * loops[n].images_per_iteration:9.1f} img/s" for n, r in rates.items()),
              flush=True)
    return {"device": device, "loops": loops, "iters": iters, "rates": rates,
            "load": (load_before, os.getloadavg()), "machine": machine(device)}


def table(res: dict, command: str) -> str:
    """The markdown rows: per recipe its settings, path, images/s and iterations/s (median, range), ratio."""
    loops, rates, device = res["loops"], res["rates"], res["device"]
    img = {n: [r * loops[n].images_per_iteration for r in rates[n]] for n in loops}
    med = {n: statistics.median(v) for n, v in img.items()}
    (l1, l5, _), (a1, a5, _) = res["load"]
    lines = [
        f"{dt.date.today().isoformat()} · {res['machine']} · load average (1/5 min) {l1:.2f}/{l5:.2f} before, "
        f"{a1:.2f}/{a5:.2f} after · `{command}`",
        "",
        "| recipe | width · batch · d_steps · R1 | precision | path | images/s, median (min – max) | iterations/s "
        "| windows × iterations | images/s vs article |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for name, loop in loops.items():
        t, m = loop.params.train, loop.params.model
        r1 = f"every {t.r1_every}" if t.r1_gamma > 0 else "off"
        precision = "bf16" if loop.dtype is torch.bfloat16 else "fp32"
        lines.append(
            f"| {name} | {m.gen_filters} · {t.batch_size} · {t.d_steps} · {r1} | {precision} | "
            f"{path_label(loop.trainer)} | {med[name]:,.0f} ({min(img[name]):,.0f} – {max(img[name]):,.0f}) | "
            f"{statistics.median(rates[name]):,.1f} | {len(rates[name])} × {res['iters'][name]} | "
            f"{med[name] / med['article']:.2f}× |")
    if device.type == "cuda":
        met = med["default"] >= med["article"] and med["default"] >= FLOOR_IMAGES_S
        lines += ["", f"Floor (default >= article and >= {FLOOR_IMAGES_S:,} images/s): {'met' if met else 'NOT met'}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--seconds", type=float, default=30.0, help="timed seconds per recipe, over all windows")
    parser.add_argument("--repeats", type=int, default=5, help="timed windows per recipe")
    parser.add_argument("--frames", type=int, default=8192, help="random frames on the device")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--write", action="store_true", help="also write the table into --results")
    parser.add_argument("--results", default=str(RESULTS_MD),
                        help="the markdown file --write updates (default benchmarks/RESULTS.md; a new file is made)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = measure(args)
    text = table(res, "python benchmarks/bench_recipes.py " + " ".join(sys.argv[1:] if argv is None else argv))
    print(text)
    if args.write:
        tag = "bench-recipes-" + ("gpu" if res["device"].type == "cuda" else "cpu")
        results = Path(args.results)
        if not results.exists():
            results.write_text("")
        write_block(tag, text, new_section=SECTION, path=results)
        print(f"updated {results} ({tag})")


if __name__ == "__main__":
    main()
