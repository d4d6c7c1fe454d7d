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
FLOORS_180S = {"fid_raw": 60.0, "fid_palette": 18.0, "share_gap": 5.0}  # each seed of the default (issue 25)
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
    rpgan_gdecay = {"train.loss": "rpgan", "train.r1_gamma": 10 * train.r1_gamma,
                    "train.r2_gamma": 10 * train.r1_gamma, "train.gamma_end_fraction": 0.1}
    cpu_loss_and_rates = {**rpgan_gdecay, "train.lr_g": 2 * train.lr_g}  # the cpu profile's, as of 2026-12-05
    return {
        "default": {},
        "article": {"train.recipe": "article"},
        "uncond": {"model.conditional": False},  # no game labels: the GPU default before issue 25
        "r1-every-1": {"train.r1_every": 1},  # every step alike: one graph, R1 at every step
        "b64": batch_overrides(train, 64),
        "b128": batch_overrides(train, 128),
        "d2": {"train.d_steps": 2},
        "w48": {"model.gen_filters": 48, "model.disc_filters": 48},
        # issue 27's R3GAN loss and schedules: RpGAN with R1 and R2 at R1's gamma; the same starting at 10x that gamma
        # and falling back to it by a half cosine; that with G's lr doubled (the cpu profile's loss and rates);
        # the EMA ramp; G painting softmax mixes of the palette, alone and on the cpu profile's loss and rates
        "rpgan": {"train.loss": "rpgan", "train.r2_gamma": train.r1_gamma},
        "rpgan-gdecay": rpgan_gdecay,
        "rpgan-gdecay-lrg2x": cpu_loss_and_rates,
        "emaramp": {"train.ema_rampup": 0.05},
        "palhead": {"model.palette_head": "soft"},
        "rpgan-gdecay-lrg2x-palhead": {**cpu_loss_and_rates, "model.palette_head": "soft"},
    }


SYNC_EVERY = 100  # steps between loss reads; also where an --also-at save can happen (~0.2 s apart on an H200)
SAVE_LATE_BY = 0.02  # an --also-at save taken more than this fraction past its time is dropped, not mislabelled


def run_params(base: Params, name: str, seed: int, budget_s: float, device: str, saves: bool = False,
               sync_every: int = SYNC_EVERY) -> Params:
    gpu = with_profile(base, "gpu")
    return with_overrides(gpu, {
        **candidates(gpu.train)[name], "seed": seed, "train.device": device, "train.iterations": 10**9,
        "train.time_budget_s": budget_s, "train.fid_every": sync_every if saves else 0,
        "train.log_every": sync_every, "train.image_every": 10**9, "train.checkpoint_every": 10**9,
    })


class SavesAt:
    """The EMA generator as it stood when training time first reached each of `seconds`, taken inside one longer
    run (with `train.lr_decay: none` nothing else depends on the budget, so it is the generator a run of that
    budget ends with). train_gan calls `log_fn` (the rate, so the training seconds) and then `fid_fn` (the
    generator, its value unused: the final generator is the last one either way) at every sync step. A time first
    passed more than SAVE_LATE_BY past it (syncs too far apart for the run's speed) gets no generator: it would be
    a longer run's, under the shorter budget's name; `missed` lists it with the time the sync came."""

    def __init__(self, seconds: list[float], images_per_step: int):
        self.pending, self.images_per_step = sorted(seconds), images_per_step
        self.rate, self.saved, self.missed = 0.0, [], []

    def log_fn(self, step: int, metrics: dict[str, float]) -> None:
        self.rate = metrics.get("images_per_s", self.rate)

    def fid_fn(self, step: int, generator: torch.nn.Module) -> float:
        from src.models import cpu_state

        elapsed = step * self.images_per_step / self.rate if self.rate > 0 else 0.0
        while self.pending and elapsed >= self.pending[0]:
            at_s = self.pending.pop(0)
            if elapsed > at_s * (1 + SAVE_LATE_BY):
                self.missed.append((at_s, round(elapsed, 1)))
                continue
            self.saved.append({"at_s": at_s, "train_seconds": round(elapsed, 1), "iterations": step,
                               "images_per_s": round(self.rate, 1), "state": cpu_state(generator)})
        return 0.0


def train_one(name: str, seed: int, args: argparse.Namespace) -> None:
    from src.atomic import save_torch_atomic
    from src.data import load_snapshot
    from src.models import cpu_state
    from src.params import effective
    from src.training import train_gan
    from src.training.outputs import generator_payload
    from src.training.step_graphs import graph_plan

    also_at = [s for s in args.also_at or [] if s < args.budget_s]
    params = effective(run_params(load_params(), name, seed, args.budget_s, args.device, saves=bool(also_at),
                                  sync_every=args.sync_every))
    snapshot = load_snapshot(Path(args.snapshot), verify=False)
    saves = SavesAt(also_at, params.train.batch_size * params.train.d_steps)
    result = train_gan(params, snapshot, checkpoint_dir=None, progress=False,
                       **({"log_fn": saves.log_fn, "fid_fn": saves.fid_fn} if also_at else {}))
    t, device = params.train, torch.device(args.device)
    record = {
        "recipe": name, "seed": seed, "overrides": candidates(with_profile(load_params(), "gpu").train)[name],
        "settings": {"model": params.model.model_dump(), "train": t.model_dump()},
        "date": dt.date.today().isoformat(), "machine": machine(device), "torch": str(torch.__version__),
        "step_path": graph_plan(t.cuda_graphs, t.compile, t.r1_gamma, t.r1_every, device, 1, 3)[1],
        "budget_s": args.budget_s, "checkpointed": False, "train_seconds": round(result.elapsed_s, 1),
        "iterations": result.iterations, "images_per_s": round(result.images_per_s, 1),
        "updates_per_s": round(result.iterations / result.elapsed_s, 1), "precision": result.precision,
        "snapshot_sha256": snapshot.sha256,
    }
    runs = [(f"{name}-seed{seed}", record, cpu_state(result.eval_generator))]
    for at_s, came_s in saves.missed:
        print(f"{name}-seed{seed}: no {at_s:g}-s generator: the first sync after {at_s:g} s came at {came_s:g} s "
              "(lower --sync-every)", flush=True)
    for save in saves.saved:  # the same run, cut short: its own budget, count and rate
        cut = {"budget_s": save["at_s"], "train_seconds": save["train_seconds"], "iterations": save["iterations"],
               "images_per_s": save["images_per_s"],
               "updates_per_s": round(save["iterations"] / save["train_seconds"], 1),
               "taken_from": f"the {args.budget_s:g}-s run, when its training time reached {save['at_s']:g} s"}
        runs.append((f"{name}-seed{seed}-{save['at_s']:g}s", {**record, **cut}, save["state"]))
    for stem, rec, state in runs:
        payload = generator_payload(state, params, rec["iterations"], "ema", games=snapshot.games,
                                    snapshot_sha256=snapshot.sha256)
        path = Path(args.out) / f"{stem}.generator.pt"
        save_torch_atomic(path, {**payload, "study_record": rec})
        print(f"{path.name}: {rec['iterations']} iterations in {rec['train_seconds']} s, "
              f"{rec['images_per_s']:,.0f} images/s, {rec['updates_per_s']:,.1f} updates/s; {rec['step_path']}",
              flush=True)


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


def share_gap(e: dict[str, Any]) -> float:
    """The largest gap, in points, between a game's share of the generated screens (as drawn: the primary
    post-processing) and its share of the snapshot."""
    games = [k.removeprefix("coverage_share_snapshot/") for k in e if k.startswith("coverage_share_snapshot/")]
    return max(abs(e[f"coverage_share/{g}"] - e[f"coverage_share_snapshot/{g}"]) for g in games) * 100


def table(records: list[dict[str, Any]]) -> str:
    """One row per run; one per candidate and budget (mean of its seeds, ratio to the article's at that budget);
    the floors of issue 25: at 90 s against the article, at 180 s absolute (every seed)."""
    rows = ["| candidate | budget s | seed | step path | updates | images/s | fid_raw | fid_palette | "
            "game-share TV | largest share gap, points |", "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    by: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in sorted(records, key=lambda r: (r["budget_s"], r["recipe"], r["seed"])):
        by.setdefault((r["recipe"], r["budget_s"]), []).append(r)
        e = r["eval"]
        path = r["step_path"].removeprefix("training step: ").split(",")[0].split(" (")[0]
        rows.append(f"| {r['recipe']} | {r['budget_s']:g} | {r['seed']} | {path} | {r['iterations']:,} | "
                    f"{r['images_per_s']:,.0f} | {e['fid_raw']:.1f} | {e['fid_palette']:.1f} | "
                    f"{e['coverage_tv']:.3f} | {share_gap(e):.1f} |")
    mean = {key: {k: statistics.mean(r["eval"][k] for r in runs) for k in FLOORS}
            | {"images_per_s": statistics.mean(r["images_per_s"] for r in runs)} for key, runs in by.items()}
    rows += ["", "| candidate | budget s | seeds | images/s | fid_raw | fid_palette | fid_raw / article | "
                 "fid_palette / article |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for (name, budget), m in sorted(mean.items(), key=lambda kv: (kv[0][1], kv[1]["fid_raw"])):
        article = mean.get(("article", budget))
        ratio = {k: f"{m[k] / article[k]:.2f}×" if article else "–" for k in FLOORS}
        rows.append(f"| {name} | {budget:g} | {', '.join(str(r['seed']) for r in by[name, budget])} | "
                    f"{m['images_per_s']:,.0f} | {m['fid_raw']:.1f} | {m['fid_palette']:.1f} | {ratio['fid_raw']} | "
                    f"{ratio['fid_palette']} |")
    rows.append("")
    d, article = mean.get(("default", 90.0)), mean.get(("article", 90.0))
    if d and article:
        met = [d[k] / article[k] <= FLOORS[k] for k in FLOORS]
        met.append(d["images_per_s"] >= max(article["images_per_s"], FLOOR_IMAGES_S))
        rows.append(f"Floors at 90 s (default fid_raw <= {FLOORS['fid_raw']}× and fid_palette <= "
                    f"{FLOORS['fid_palette']}× the article's, images/s >= the article's and >= {FLOOR_IMAGES_S:,}): "
                    + ", ".join("met" if m else "NOT met" for m in met) + ".")
    else:
        rows.append("Floors at 90 s: not judged (the default and the article at 90 s must both be among the runs).")
    long = by.get(("default", 180.0), [])
    if long:
        f = FLOORS_180S
        met = [all(r["eval"]["fid_raw"] <= f["fid_raw"] for r in long),
               all(r["eval"]["fid_palette"] <= f["fid_palette"] for r in long),
               all(share_gap(r["eval"]) <= f["share_gap"] for r in long)]
        rows.append(f"Floors at 180 s (every seed of the default: fid_raw <= {f['fid_raw']:g}, fid_palette <= "
                    f"{f['fid_palette']:g}, every game within ±{f['share_gap']:g} points of its share): "
                    + ", ".join("met" if m else "NOT met" for m in met) + ".")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train candidates for --budget-s seconds each (the GPU half)")
    train.add_argument("names", nargs="+", help=f"candidates: {', '.join(candidates(TrainParams()))}")
    train.add_argument("--seed", type=int, action="append", help="repeatable; default 0")
    train.add_argument("--budget-s", type=float, default=90.0, help="seconds of training per run")
    train.add_argument("--also-at", type=float, action="append",
                       help="repeatable: also save the generator when training time reaches these seconds")
    train.add_argument("--sync-every", type=int, default=SYNC_EVERY,
                       help="steps between loss reads and --also-at checks (fewer on a slow device)")
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
