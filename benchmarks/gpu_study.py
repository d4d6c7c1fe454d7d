"""Candidates for the GPU top level at equal GPU time: trained on the GPU without FID, scored on a CPU afterwards.

The device machine has no room for the 96 MB Inception weights, so it only trains: each candidate for `--budget-s`
seconds of training on the default snapshot (data/snapshot, `python -m src.collect`), the `gpu` profile plus the
candidate's overrides, no FID during training; the final EMA generator goes into one file per run, in
src.train's generator format (so `src.sample` and `src.evaluate` read it), with the run's record inside. On a CPU
with the standard weights, `score` draws 2,048 screens per generator and scores them like `src.evaluate`
(raw and with the palette, against the whole holdout, game shares) and `table` compares them with the article's.

    python benchmarks/gpu_study.py train default b64 --seed 0 --seed 1 --budget-s 90 --device cuda --out DIR
    python benchmarks/gpu_study.py score DIR                 # on the CPU, standard Inception weights
    python benchmarks/gpu_study.py table DIR [DIR ...] [--write]

`benchmarks/gpu_session.sh` runs the GPU half within one device call; docs/gpu.md gives the whole protocol.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.quality_study import with_overrides  # noqa: E402
from benchmarks.results_md import machine, write_block  # noqa: E402
from src.params import Params, TrainParams, load_params, with_profile  # noqa: E402

SNAPSHOT = REPO / "data" / "snapshot"
FLOORS = {"fid_raw": 0.4, "fid_palette": 0.3}  # the default's mean FID over the article's, at equal GPU time (issue 25)
FLOOR_IMAGES_S = 9_600
SECTION = "## The GPU path: the default graphed (issue 25)\n\n"  # in benchmarks/RESULTS.md


def batch_overrides(train: TrainParams, batch: int) -> dict[str, Any]:
    """`batch` with the EMA horizon kept in images (StyleGAN2 counts it so): decay ** (batch / old batch), the
    warm-up in steps shrunk alike. The learning rates stay (StyleGAN2-ADA keeps its lr across batch sizes)."""
    scale = batch / train.batch_size
    return {"train.batch_size": batch, "train.ema_decay": round(train.ema_decay ** scale, 6),
            "train.ema_warmup": max(1, round(train.ema_warmup / scale))}


def candidates(train: TrainParams) -> dict[str, dict[str, Any]]:
    """Each candidate as overrides of the gpu profile (params.yaml's top level)."""
    return {
        "default": {},
        "article": {"train.recipe": "article"},
        "r1-every-1": {"train.r1_every": 1},  # every step alike: one graph, R1 at every step
        "b64": batch_overrides(train, 64),
        "b128": batch_overrides(train, 128),
        "d2": {"train.d_steps": 2},
        "w48": {"model.gen_filters": 48, "model.disc_filters": 48},
    }


def run_params(base: Params, name: str, seed: int, budget_s: float, device: str) -> Params:
    gpu = with_profile(base, "gpu")
    return with_overrides(gpu, {
        **candidates(gpu.train)[name], "seed": seed, "train.device": device, "train.iterations": 10**9,
        "train.time_budget_s": budget_s, "train.fid_every": 0, "train.log_every": 100,
        "train.image_every": 10**9, "train.checkpoint_every": 10**9,
    })


def train_one(name: str, seed: int, args: argparse.Namespace) -> Path:
    from src.atomic import save_torch_atomic
    from src.data import load_snapshot
    from src.models import cpu_state
    from src.params import effective
    from src.training import train_gan
    from src.training.outputs import generator_payload
    from src.training.step_graphs import graph_plan

    params = run_params(load_params(), name, seed, args.budget_s, args.device)
    snapshot = load_snapshot(Path(args.snapshot), verify=False)
    result = train_gan(params, snapshot, checkpoint_dir=None, progress=False)
    t, device = effective(params).train, torch.device(args.device)
    record = {
        "recipe": name, "seed": seed, "overrides": candidates(with_profile(load_params(), "gpu").train)[name],
        "settings": {"model": effective(params).model.model_dump(), "train": t.model_dump()},
        "date": dt.date.today().isoformat(), "machine": machine(device), "torch": str(torch.__version__),
        "step_path": graph_plan(t.cuda_graphs, t.compile, t.r1_gamma, t.r1_every, device, 1, 3)[1],
        "budget_s": args.budget_s, "checkpointed": False, "train_seconds": round(result.elapsed_s, 1),
        "iterations": result.iterations, "images_per_s": round(result.images_per_s, 1),
        "updates_per_s": round(result.iterations / result.elapsed_s, 1), "precision": result.precision,
        "snapshot_sha256": snapshot.sha256,
    }
    payload = generator_payload(cpu_state(result.eval_generator), params, result.iterations, "ema",
                                games=snapshot.games, snapshot_sha256=snapshot.sha256)
    path = Path(args.out) / f"{name}-seed{seed}.generator.pt"
    save_torch_atomic(path, {**payload, "study_record": record})
    print(f"{path.name}: {record['iterations']} iterations in {record['train_seconds']} s, "
          f"{record['images_per_s']:,.0f} images/s, {record['updates_per_s']:,.1f} updates/s; {record['step_path']}",
          flush=True)
    return path


def score_dir(folder: Path, args: argparse.Namespace) -> None:
    """Score every generator in `folder` not scored yet; writes <run>.json (record + evaluate's metrics)."""
    from src.atomic import write_json_atomic
    from src.data import load_snapshot
    from src.errors import UserError
    from src.evaluate import evaluate_generator, save_grid
    from src.generator import load_generator
    from src.inception import InceptionFeatures, resolve_inception_weights

    base = load_params()
    snapshot = load_snapshot(Path(args.snapshot))
    extractor = InceptionFeatures(resolve_inception_weights(args.inception_weights), device=args.device,
                                  batch_size=100)
    for path in sorted(folder.glob("*.generator.pt")):
        out = path.with_name(path.name.removesuffix(".generator.pt") + ".json")
        if out.exists() and not args.force:
            continue
        generator, meta = load_generator(path, device=args.device)
        record = meta.get("study_record")
        if record is None:
            raise UserError(f"{path} holds no study record: score only files written by `gpu_study.py train`")
        if record["snapshot_sha256"] != snapshot.sha256:
            raise UserError(f"{path} was trained on snapshot {record['snapshot_sha256'][:12]}, {args.snapshot} is "
                            f"{snapshot.sha256[:12]}; rebuild it with `python -m src.collect` from the same "
                            "params.yaml")
        metrics, fake = evaluate_generator(generator, snapshot, extractor, latent_dim=int(meta["latent_dim"]),
                                           num_samples=args.samples, kid_subset_size=base.evaluate.kid_subset_size,
                                           seed=record["seed"], palette_size=base.model.palette_size)
        save_grid(fake, snapshot.holdout_images, out.with_suffix(".png"))
        record = {**record, "eval": metrics, "fid": metrics["fid"], "kid_mean": metrics["kid_mean"],
                  "best_step": None, "scored_on": machine(args.device)}
        write_json_atomic(out, record)
        print(f"{out.name}: fid_raw {metrics.get('fid_raw', metrics['fid']):.1f}, "
              f"fid_palette {metrics.get('fid_palette', float('nan')):.1f}, TV {metrics['coverage_tv']:.3f}",
              flush=True)


def table(records: list[dict[str, Any]]) -> str:
    """One row per run, one per candidate (mean of its seeds, ratio to the article's), and the floors."""
    rows = ["| candidate | seed | step path | updates | images/s | fid_raw | fid_palette | game-share TV |",
            "|---|---|---|---:|---:|---:|---:|---:|"]
    by: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(records, key=lambda r: (r["recipe"], r["seed"])):
        by.setdefault(r["recipe"], []).append(r)
        e = r["eval"]
        rows.append(f"| {r['recipe']} | {r['seed']} | {r['step_path'].removeprefix('training step: ')} | "
                    f"{r['iterations']:,} | {r['images_per_s']:,.0f} | {e['fid_raw']:.1f} | {e['fid_palette']:.1f} | "
                    f"{e['coverage_tv']:.3f} |")
    mean = {name: {k: statistics.mean(r["eval"][k] for r in runs) for k in FLOORS}
            | {"images_per_s": statistics.mean(r["images_per_s"] for r in runs)} for name, runs in by.items()}
    rows += ["", "| candidate | seeds | images/s | fid_raw | fid_palette | fid_raw / article | fid_palette / article |",
             "|---|---|---:|---:|---:|---:|---:|"]
    article = mean.get("article")
    for name, m in sorted(mean.items(), key=lambda kv: kv[1]["fid_raw"]):
        ratio = {k: f"{m[k] / article[k]:.2f}×" if article else "–" for k in FLOORS}
        rows.append(f"| {name} | {', '.join(str(r['seed']) for r in by[name])} | {m['images_per_s']:,.0f} | "
                    f"{m['fid_raw']:.1f} | {m['fid_palette']:.1f} | {ratio['fid_raw']} | {ratio['fid_palette']} |")
    if article and "default" in mean:
        d = mean["default"]
        met = [d[k] / article[k] <= FLOORS[k] for k in FLOORS]
        met.append(d["images_per_s"] >= max(article["images_per_s"], FLOOR_IMAGES_S))
        rows += ["", f"Floors (default fid_raw <= {FLOORS['fid_raw']}× and fid_palette <= {FLOORS['fid_palette']}× "
                     f"the article's, images/s >= the article's and >= {FLOOR_IMAGES_S:,}): "
                     + ", ".join("met" if m else "NOT met" for m in met)]
    else:
        rows += ["", "Floors: not judged (the default and the article must both be among the runs)."]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train candidates for --budget-s seconds each (the GPU half)")
    train.add_argument("names", nargs="+", help=f"candidates: {', '.join(candidates(TrainParams()))}")
    train.add_argument("--seed", type=int, action="append", help="repeatable; default 0")
    train.add_argument("--budget-s", type=float, default=90.0, help="seconds of training per run")
    train.add_argument("--device", default="cuda")
    train.add_argument("--snapshot", default=str(SNAPSHOT))
    train.add_argument("--out", required=True, help="folder for the generator files")
    score = sub.add_parser("score", help="score the generators in DIR (the CPU half)")
    score.add_argument("dir")
    score.add_argument("--samples", type=int, default=2048)
    score.add_argument("--device", default="cpu")
    score.add_argument("--snapshot", default=str(SNAPSHOT))
    score.add_argument("--inception-weights", default=None, help="default: the torch hub cache, as evaluate uses")
    score.add_argument("--force", action="store_true", help="score again runs already scored")
    tab = sub.add_parser("table", help="the comparison table of the scored runs in DIR...")
    tab.add_argument("dirs", nargs="+")
    tab.add_argument("--write", action="store_true", help="also write it into benchmarks/RESULTS.md")
    args = parser.parse_args(argv)

    if args.command == "train":
        known = candidates(TrainParams())
        unknown = [n for n in args.names if n not in known]
        if unknown:
            parser.error(f"unknown candidate(s) {', '.join(unknown)}; choose from {', '.join(known)}")
        Path(args.out).mkdir(parents=True, exist_ok=True)
        for seed in args.seed or [0]:
            for name in args.names:
                train_one(name, seed, args)
    elif args.command == "score":
        score_dir(Path(args.dir), args)
    else:
        records = [json.loads(p.read_text()) for d in args.dirs for p in sorted(Path(d).glob("*.json"))]
        text = table([r for r in records if "eval" in r and "step_path" in r])
        print(text)
        if args.write:
            write_block("gpu-study", text, new_section=SECTION)


if __name__ == "__main__":
    main()
