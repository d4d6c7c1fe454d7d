"""Quality at equal budget: GAN recipes trained for the same wall-clock time, scored by standard FID.

Every run trains one recipe with `src.training.train_gan` for `--budget-s` seconds of training on
the study snapshot (params.yaml's `collect` settings with a 2,100-frame holdout), measuring FID
on `train.fid_samples` images every `--fid-every` steps against training frames and keeping the
best generator exactly as `dvc repro` does (the FID clock is paused, so it is not part of the
budget). The kept generator is then scored like the evaluate stage: FID and KID of `--samples`
generated screens against the whole holdout. A run writes `benchmarks/quality/<recipe>-seed<N>.json`
and a sample grid beside it; `report` turns those files into the table of benchmarks/RESULTS.md.

    python benchmarks/quality_study.py snapshot                   # once: data/study/snapshot
    python benchmarks/quality_study.py run article --seed 0       # one recipe, one seed
    python benchmarks/quality_study.py run article custom --seed 0 --seed 1 --threads 1
    python benchmarks/quality_study.py report [--write]
    python benchmarks/quality_study.py report --yardstick --results-dir DIR [--write]   # like-for-like table
    python benchmarks/quality_study.py report --against RECIPE --results-dir DIR [--write --block NAME]  # pairs
    python benchmarks/quality_study.py report --against RECIPE --budget-s 3600 --results-dir DIR  # pairs at 60 min
    python benchmarks/quality_study.py run article --budget-s 600 --checkpoints DIR  # then 1800, 3600: one run, extended
    python benchmarks/quality_study.py report --plot curves.png --results-dir DIR [--recipe R ...] [--write]

A run's record also holds everything `evaluate` measures (key "eval"): the FID of the same latents drawn
raw and with the palette, floors, precision/recall, game shares and per-game FID.

Runs of one comparison should share the machine the same way: the study ran them in pairs, each
process on one torch thread, so both see the same load.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.results_md import machine, write_block  # noqa: E402
from src.params import Params, effective, load_params  # noqa: E402

STUDY_SNAPSHOT = REPO / "data" / "study" / "snapshot"
RESULTS_DIR = REPO / "benchmarks" / "quality"
HOLDOUT_FRAMES = 2100
FEATURE_CACHE = STUDY_SNAPSHOT.parent / "features"  # real frames' Inception features, shared by every run

# Candidates, as overrides of params.yaml. `article` is the article's recipe (params.effective);
# the others change model width, batch size, learning rates (the tuner's best), EMA, loss, spectral
# norm, augmentation, conditioning and the palette one group at a time. TEXTBOOK pins every key the
# others build on, so a recipe keeps its meaning when params.yaml's defaults change.
TUNED_LR = {"train.lr_g": 2.74e-4, "train.lr_d": 1.42e-3, "train.beta1": 0.064, "train.beta2": 0.909}
TEXTBOOK = {"train.recipe": "custom", "model.gen_filters": 64, "model.disc_filters": 64, "train.batch_size": 64,
            "train.lr_g": 2e-4, "train.lr_d": 2e-4, "train.beta1": 0.5, "train.beta2": 0.999, "train.loss": "bce",
            "train.d_activation": "leaky_relu", "train.init": "dcgan", "train.spectral_norm": False,
            "train.ema_decay": 0.999, "train.ema_warmup": 1000, "train.augment": "", "train.lr_decay": "none",
            "model.palette_size": 0, "model.upsample": "transposed", "model.conditional": False,
            "model.arch": "dcgan", "model.skip_rgb": False, "model.minibatch_std": 0, "train.r1_gamma": 0.0,
            "model.palette_head": "none", "train.r2_gamma": 0.0, "train.gamma_end_fraction": 1.0,
            "train.ema_rampup": 0.0}
SMALL = {**TEXTBOOK, "model.gen_filters": 32, "model.disc_filters": 32, "train.batch_size": 32}
R1_MBSTD = {**SMALL, **TUNED_LR, "train.r1_gamma": 0.1, "model.minibatch_std": 4}
CPU_RECIPE = {**R1_MBSTD, "train.batch_size": 16, "model.conditional": True, "train.ema_decay": 0.995}
# RpGAN + R1 + R2 with gamma 10x the constant run's, falling by a half cosine to 0.1, as R3GAN decays it
CPU_RPGAN_GDECAY = {**CPU_RECIPE, "train.loss": "rpgan", "train.r1_gamma": 1.0, "train.r2_gamma": 1.0,
                    "train.gamma_end_fraction": 0.1}
CPU_RPGAN_GDECAY_LRG2X = {**CPU_RPGAN_GDECAY, "train.lr_g": 2 * TUNED_LR["train.lr_g"]}
CPU_RPGAN_GDECAY_LRG2X_PALHEAD = {**CPU_RPGAN_GDECAY_LRG2X, "model.palette_size": 16, "model.palette_head": "soft"}
CPU_PROFILE_RECIPE = "cpu-rpgan-r2-gdecay-lrg2x-palhead"  # params.yaml's profiles.cpu trains this (a test checks)
GPU_DEFAULT_RECIPE = "small-tuned-r1-mbstd-cond"  # params.yaml's top level (the gpu profile) trains this (a test checks)
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},  # params.yaml as it is
    "article": {"train.recipe": "article"},
    "textbook": TEXTBOOK,  # DCGAN paper settings + EMA, width 64, batch 64
    "small": SMALL,  # width 32, batch 32
    "small-tuned": {**SMALL, **TUNED_LR},
    "small-tuned-noema": {**SMALL, **TUNED_LR, "train.ema_decay": 0.0},
    "small-tuned-b16": {**SMALL, **TUNED_LR, "train.batch_size": 16},
    "small-tuned-aug": {**SMALL, **TUNED_LR, "train.augment": "translation,color"},
    "small-tuned-nearest": {**SMALL, **TUNED_LR, "model.upsample": "nearest"},
    "small-nearest": {**SMALL, "model.upsample": "nearest"},
    "small-tuned-sn": {**SMALL, **TUNED_LR, "train.spectral_norm": True},
    "small-tuned-cond": {**SMALL, **TUNED_LR, "model.conditional": True},
    "small-tuned-fp32": {**SMALL, **TUNED_LR, "train.precision": "fp32"},
    "tiny-tuned": {**SMALL, **TUNED_LR, "model.gen_filters": 16, "model.disc_filters": 16},
    "small-hinge-sn-nearest": {**SMALL, "train.loss": "hinge", "train.spectral_norm": True, "train.lr_g": 1e-4,
                               "train.lr_d": 4e-4, "train.beta1": 0.0, "train.beta2": 0.9, "model.upsample": "nearest"},
    "small-hinge-sn": {**SMALL, "train.loss": "hinge", "train.spectral_norm": True, "train.lr_g": 1e-4,
                       "train.lr_d": 4e-4, "train.beta1": 0.0, "train.beta2": 0.9},
    "tuned-64": {**TEXTBOOK, **TUNED_LR, "train.batch_size": 32},
    # Second round (screened first on a GPU at the step counts these reach in 10 CPU-minutes).
    "small-tuned-decay": {**SMALL, **TUNED_LR, "train.lr_decay": "linear"},
    "small-tuned-ema995": {**SMALL, **TUNED_LR, "train.ema_decay": 0.995},
    "small-tuned-ema99": {**SMALL, **TUNED_LR, "train.ema_decay": 0.99},
    "small-tuned-decay-ema995": {**SMALL, **TUNED_LR, "train.lr_decay": "linear", "train.ema_decay": 0.995},
    "small-tuned-decay-noema": {**SMALL, **TUNED_LR, "train.lr_decay": "linear", "train.ema_decay": 0.0},
    "small-tuned-beta05": {**SMALL, **TUNED_LR, "train.beta1": 0.5},
    "small-tuned-lrg2x": {**SMALL, **TUNED_LR, "train.lr_g": 5.48e-4},
    "small-tuned-lrd-half": {**SMALL, **TUNED_LR, "train.lr_d": 7.1e-4},
    "small-tuned-lr2x-decay": {**SMALL, **TUNED_LR, "train.lr_g": 5.48e-4, "train.lr_d": 2.84e-3,
                               "train.lr_decay": "linear"},
    "small-tuned-lrg2x-decay": {**SMALL, **TUNED_LR, "train.lr_g": 5.48e-4, "train.lr_decay": "linear"},
    "small-tuned-sn-decay": {**SMALL, **TUNED_LR, "train.spectral_norm": True, "train.lr_decay": "linear"},
    "small-decay": {**SMALL, "train.lr_decay": "linear"},
    "small-tuned-torchinit": {**SMALL, **TUNED_LR, "train.init": "default"},
    "small-tuned-hinge": {**SMALL, **TUNED_LR, "train.loss": "hinge"},
    "small-tuned-translation": {**SMALL, **TUNED_LR, "train.augment": "translation"},
    "small-tuned-b64": {**SMALL, **TUNED_LR, "train.batch_size": 64},
    "small-tuned-b16-decay": {**SMALL, **TUNED_LR, "train.batch_size": 16, "train.lr_decay": "linear"},
    "small-tuned-g48": {**SMALL, **TUNED_LR, "model.gen_filters": 48},
    "small-tuned-d48": {**SMALL, **TUNED_LR, "model.disc_filters": 48},
    "small-tuned-pal16": {**SMALL, **TUNED_LR, "model.palette_size": 16},  # palette at drawing time
    # Third round: the architecture options of src/models.py (RESULTS.md says which were run).
    "small-tuned-skip": {**SMALL, **TUNED_LR, "model.skip_rgb": True},
    "small-tuned-skip-bilinear": {**SMALL, **TUNED_LR, "model.skip_rgb": True, "model.upsample": "bilinear"},
    "small-tuned-mbstd": {**SMALL, **TUNED_LR, "model.minibatch_std": 4},
    "small-tuned-r1-mbstd": R1_MBSTD,  # the GPU default until issue 25; the cpu profile's until the fifth round
    "small-tuned-skip-mbstd": {**SMALL, **TUNED_LR, "model.skip_rgb": True, "model.minibatch_std": 4},
    # the game mix set by labels, not left to G; the GPU default since issue 25
    "small-tuned-r1-mbstd-cond": {**R1_MBSTD, "model.conditional": True},
    "resnet16-tuned": {**SMALL, **TUNED_LR, "model.arch": "resnet", "model.gen_filters": 16,
                       "model.disc_filters": 16},
    # Fourth round: R1 + minibatch std made longer training pay; these try to get there sooner.
    "small-tuned-r1-mbstd-lr2x": {**R1_MBSTD, "train.lr_g": 5.48e-4, "train.lr_d": 2.84e-3},
    "small-tuned-r1-mbstd-lrg2x": {**R1_MBSTD, "train.lr_g": 5.48e-4},
    "small-tuned-r1-mbstd-b16": {**R1_MBSTD, "train.batch_size": 16},
    "small-tuned-r1-mbstd-w24": {**R1_MBSTD, "model.gen_filters": 24, "model.disc_filters": 24},
    "small-tuned-r1-mbstd-ema995": {**R1_MBSTD, "train.ema_decay": 0.995},
    "small-tuned-r1-mbstd-palhead": {**R1_MBSTD, "model.palette_size": 16, "model.palette_head": "soft"},
    "small-tuned-r1-mbstd-palhard": {**R1_MBSTD, "model.palette_size": 16, "model.palette_head": "hard"},
    # Fifth round: batch 16 reached the fall in FID within 10 minutes; a shorter EMA follows it sooner,
    # game labels keep every game drawn (batch 16 and width 24 lost Pong on some seeds).
    "small-tuned-r1-mbstd-b16-ema995": {**R1_MBSTD, "train.batch_size": 16, "train.ema_decay": 0.995},
    "small-tuned-r1-mbstd-b16-cond": {**R1_MBSTD, "train.batch_size": 16, "model.conditional": True},
    "small-tuned-r1-mbstd-b16-cond-ema995": CPU_RECIPE,
    "small-tuned-r1-mbstd-b8": {**R1_MBSTD, "train.batch_size": 8},
    # Sixth round (issue 27): the R3GAN baseline's loss and schedules, and augmentation, on the cpu profile's recipe.
    "cpu-rpgan-r2": {**CPU_RECIPE, "train.loss": "rpgan", "train.r2_gamma": 0.1},  # RpGAN + R1 + R2, gamma 0.1
    "cpu-rpgan-r2-gdecay": CPU_RPGAN_GDECAY,
    "cpu-emaramp": {**CPU_RECIPE, "train.ema_rampup": 0.05},  # StyleGAN2-ADA's EMA ramp in images
    "cpu-aug": {**CPU_RECIPE, "train.augment": "translation,color"},  # DiffAugment
    # Seventh round (issue 27): R3GAN's other schedules on the cpu profile's recipe. Both learning rates fall
    # linearly to 0 at the budget; or the EMA horizon grows with the run (half-life 5% of the images seen, up to
    # EMA 0.999's: ~4,500 images at the end of 10 minutes, where the profile's 0.995 holds ~2,200 after warmup).
    "cpu-rpgan-r2-gdecay-lrdecay": {**CPU_RPGAN_GDECAY, "train.lr_decay": "linear"},
    "cpu-rpgan-r2-gdecay-emaramp": {**CPU_RPGAN_GDECAY, "train.ema_decay": 0.999, "train.ema_rampup": 0.05},
    # Eighth round (issue 27): more updates or a shorter lag at 10 minutes, where FID is still falling at the end.
    # Batch 8 (batch 16 gave 1.65x the steps of 32 and won), or an EMA horizon of ~100 steps instead of ~200.
    "cpu-rpgan-r2-gdecay-b8": {**CPU_RPGAN_GDECAY, "train.batch_size": 8},
    "cpu-rpgan-r2-gdecay-ema99": {**CPU_RPGAN_GDECAY, "train.ema_decay": 0.99},
    # Ninth round: G's lr doubled (the tuner chose both lrs for bce without R1; the cpu profile for part of 2026-12-05),
    # or gamma falling from 3.0 instead of 1.0 to the same 0.1.
    "cpu-rpgan-r2-gdecay-lrg2x": CPU_RPGAN_GDECAY_LRG2X,
    "cpu-rpgan-r2-g3decay": {**CPU_RPGAN_GDECAY, "train.r1_gamma": 3.0, "train.r2_gamma": 3.0,
                             "train.gamma_end_fraction": 1 / 30},
    # Tenth round (60, 30 and 10 minutes): G paints each pixel as a softmax mix of the 16 palette colours (raw FID
    # stalled near 78 from 30 to 60 minutes while the same generator snapped to the palette scored ~19). The cpu
    # profile since 2026-12-05.
    "cpu-rpgan-r2-gdecay-lrg2x-palhead": CPU_RPGAN_GDECAY_LRG2X_PALHEAD,
    # Eleventh round: a wider G on it (AirRaid, its weakest game, draws buildings and aliens with smears).
    "cpu-rpgan-r2-gdecay-lrg2x-palhead-g48": {**CPU_RPGAN_GDECAY_LRG2X_PALHEAD, "model.gen_filters": 48},
}


def with_overrides(params: Params, overrides: dict[str, Any]) -> Params:
    """`params` with dotted-key overrides applied and validated again."""
    raw = params.model_dump()
    for key, value in overrides.items():
        *section, name = key.split(".")
        (raw[section[0]] if section else raw)[name] = value
    return Params.model_validate(raw)


def study_params(base: Params, recipe: str, seed: int, budget_s: float | None, fid_every: int, fid_samples: int,
                 samples: int, device: str = "cpu", iterations: int | None = None,
                 inception_weights: str | None = None) -> Params:
    """The recipe's params for one study run, as they run (`effective`, which train_gan insists on): a time
    budget, or (`iterations`) a step budget instead."""
    return effective(with_overrides(base, {
        **RECIPES[recipe],
        "seed": seed, "train.device": device, "train.iterations": iterations or 10**9,
        "train.time_budget_s": None if iterations else budget_s,
        "train.fid_every": fid_every, "train.fid_samples": fid_samples, "train.log_every": 100,
        "train.image_every": 10**9, "train.checkpoint_every": 10**9, "evaluate.num_samples": samples,
        "evaluate.device": device, "evaluate.inception_weights": inception_weights,
    }))


def run_one(recipe: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from src.atomic import save_torch_atomic, write_json_atomic
    from src.data import load_snapshot
    from src.evaluate import evaluate_generator, save_grid
    from src.fid import make_fid_fn
    from src.inception import InceptionFeatures, resolve_inception_weights
    from src.models import build_models, palette_of, snap_images
    from src.training import train_gan

    base = load_params()
    params = study_params(base, recipe, seed, args.budget_s, args.fid_every, args.fid_samples,
                          args.samples, args.device, args.iterations, args.inception_weights)
    device = torch.device(args.device)
    snapshot = load_snapshot(STUDY_SNAPSHOT)
    load_before = os.getloadavg()
    started = time.time()
    measure = make_fid_fn(snapshot, params, device)

    def fid_fn(step: int, generator: torch.nn.Module) -> float:
        fid = measure(step, generator)
        print(f"{recipe} seed {seed}: step {step}, FID@{args.fid_samples} {fid:.1f}", flush=True)
        return fid

    name = f"{recipe}-seed{seed}"
    # With --checkpoints a run continues its own checkpoint: a longer --budget-s extends the same run,
    # bit for bit, so one run gives every point of a time-to-quality curve. A recipe with a schedule that
    # ends at the budget (lr_decay: linear, gamma_end_fraction < 1) starts over instead, as train does.
    checkpoint_dir = Path(args.checkpoints) / name if args.checkpoints else None
    if checkpoint_dir is not None:
        name = f"{name}-{args.budget_s:.0f}s"
    result = train_gan(params, snapshot, checkpoint_dir=checkpoint_dir, fid_fn=fid_fn, progress=False)
    # --fid-every 0 keeps no best step: the run is scored on its last eval generator.
    kept = result.best_state or {k: v.detach().cpu() for k, v in result.eval_generator.state_dict().items()}
    generator, _ = build_models(params)
    generator.load_state_dict(kept)
    generator.to(device)
    extractor = InceptionFeatures(resolve_inception_weights(args.inception_weights), device=device, batch_size=100)
    # Raw recipes are drawn with params.yaml's palette too, so both columns exist for every run.
    palette_size = params.model.palette_size or base.model.palette_size
    metrics, fake = evaluate_generator(generator, snapshot, extractor, latent_dim=params.model.latent_dim,
                                       num_samples=args.samples, kid_subset_size=params.evaluate.kid_subset_size,
                                       seed=seed, palette_size=palette_size, cache_dir=FEATURE_CACHE)
    out = Path(args.results_dir)
    save_grid(fake, snapshot.holdout_images, out / f"{name}.png")
    if not generator.palette_size:  # the same screens drawn with the palette, as fid_palette scores them
        save_grid(snap_images(fake, palette_of(snapshot.train_images, palette_size)), snapshot.holdout_images,
                  out / f"{name}-palette.png")
    record = {
        "recipe": recipe,
        "seed": seed,
        "overrides": RECIPES[recipe],
        "settings": {"model": params.model.model_dump(), "train": params.train.model_dump()},
        "date": dt.date.today().isoformat(),
        "machine": machine(device),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "budget_s": None if args.iterations else args.budget_s,
        "budget_iterations": args.iterations,
        "checkpointed": checkpoint_dir is not None,  # one point of a run extended by later, longer budgets
        "inception_weights_sha256": extractor.weights_sha256,
        "train_seconds": round(result.elapsed_s, 1),
        "wall_seconds": round(time.time() - started, 1),
        "iterations": result.iterations,
        "images_per_s": round(result.images_per_s, 1),
        "fid_every": args.fid_every,
        "fid_samples": args.fid_samples,
        "fid_history": result.fid_history,
        "best_step": result.best_step,
        "best_train_fid": result.best_fid,
        "fid": metrics["fid"],
        "kid_mean": metrics["kid_mean"],
        "kid_std": metrics["kid_std"],
        "fid_holdout_vs_train": metrics["fid_holdout_vs_train"],
        "num_generated": metrics["num_generated"],
        "num_real": metrics["num_real"],
        "snapshot_sha256": metrics["snapshot_sha256"],
        "eval": metrics,  # everything evaluate writes: fid_raw/fid_palette, shares, per-game FID, precision/recall
    }
    save_torch_atomic(out / f"{name}.generator.pt", {"state_dict": kept, "params": params.model_dump()})
    write_json_atomic(out / f"{name}.json", record)
    print(f"{name}: {result.iterations} iterations in {result.elapsed_s:.0f} s, best step {result.best_step}, "
          f"FID {metrics['fid']:.1f}, KID {metrics['kid_mean']:.4f}", flush=True)
    return record


def load_records(*results_dirs: Path | str) -> list[dict[str, Any]]:
    dirs = results_dirs or (RESULTS_DIR,)
    return [json.loads(p.read_text()) for d in dirs for p in sorted(Path(d).glob("*.json"))]


def run_label(record: dict[str, Any]) -> str:
    label = f"{record['recipe']} seed {record['seed']}"
    return label + (f" · {record['budget_s'] / 60:.0f} min" if record.get("checkpointed") else "")


def spread(values: list[float], digits: int = 1) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ({min(values):.{digits}f} – {max(values):.{digits}f})"


def report(records: list[dict[str, Any]]) -> str:
    """The markdown table: one row per recipe, means and ranges over seeds, ratio to the article."""
    by_recipe: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_recipe.setdefault(r["recipe"], []).append(r)
    article = [r["fid"] for r in by_recipe.get("article", [])]
    rows = []
    for recipe, runs in sorted(by_recipe.items(), key=lambda kv: statistics.mean(r["fid"] for r in kv[1])):
        fids = [r["fid"] for r in runs]
        ratio = f"{statistics.mean(fids) / statistics.mean(article):.2f}×" if article else "–"
        rows.append(
            f"| {recipe} | {', '.join(str(r['seed']) for r in runs)} | "
            f"{spread([float(r['iterations']) for r in runs], 0)} | "
            f"{', '.join(str(r['best_step']) for r in runs)} | {spread(fids)} | "
            f"{spread([r['kid_mean'] for r in runs], 3)} | {ratio} |"
        )
    head = ("| recipe | seeds | iterations reached | best step (kept) | FID, mean (range) | KID mean | vs article |\n"
            "|---|---|---:|---|---:|---:|---:|")
    return head + "\n" + "\n".join(rows)


def fid_curves(records: list[dict[str, Any]], recipe: str) -> str:
    lines = []
    for r in records:
        if r["recipe"] == recipe:
            points = ", ".join(f"{h['step']}: {h['fid']:.0f}" for h in r["fid_history"])
            lines.append(f"- seed {r['seed']} (FID on {r['fid_samples']} samples vs training frames) — {points}")
    return "\n".join(lines)


def yardstick(records: list[dict[str, Any]]) -> str:
    """Like-for-like table of the runs scored with the full evaluate metrics (records with "eval")."""
    rows = [r for r in records if "eval" in r]
    if not rows:
        return "(no run scored with the evaluate metrics yet)"
    games = [k.split("/", 1)[1] for k in rows[0]["eval"] if k.startswith("coverage_share_snapshot/")]
    fmt = lambda v, d=1: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
    head = ("| run | shipped | FID raw | FID palette | precision / recall (shipped) | "
            "density / coverage (shipped) | TV | "
            + " | ".join(f"{g} share · FID (n)" for g in games) + " |")
    lines = [head, "|" + "---|" * (7 + len(games))]
    pair = lambda e, a, b: (f"{e[a]:.3f} / {e[b]:.3f}" if a in e else "–")  # noqa: E731  (older records lack some)
    for r in sorted(rows, key=lambda r: (r["recipe"], r["seed"], r.get("budget_s") or 0)):
        e = r["eval"]
        cells = [f"{fmt(e['coverage_share/' + g], 2)} · {fmt(e['fid_game/' + g])} ({e['count_game/' + g]})" for g in games]
        lines.append(f"| {run_label(r)} | {e['post_processing']} | {fmt(e.get('fid_raw'))} | "
                     f"{fmt(e.get('fid_palette'))} | {pair(e, 'precision', 'recall')} | "
                     f"{pair(e, 'density', 'coverage')} | "
                     f"{e['coverage_tv']:.3f} | "
                     + " | ".join(cells) + " |")
    # the fullest record's floors; a game's cell gives its raw floor, then its palette floor where recorded
    e = max((r["eval"] for r in rows),
            key=lambda e: ("density_train_frames" in e, f"fid_game_floor_palette/{games[0]}" in e))
    lines.append(
        f"| floors (real train frames) | – | {fmt(e['fid_holdout_vs_train'])} | {fmt(e.get('fid_floor_palette'))} | "
        f"{pair(e, 'precision_train_frames', 'recall_train_frames')} | "
        f"{pair(e, 'density_train_frames', 'coverage_train_frames')} | – | "
        + " | ".join(f"{fmt(e['coverage_share_snapshot/' + g], 2)} · {fmt(e['fid_game_floor/' + g])}"
                     + (f" / {fmt(e['fid_game_floor_palette/' + g])}" if f"fid_game_floor_palette/{g}" in e else "")
                     for g in games)
        + " |")
    return "\n".join(lines)


def against(records: list[dict[str, Any]], baseline: str, budget_s: float | None = None) -> str:
    """Each recipe against `baseline` seed by seed (runs that shared the machine as a pair), raw / palette FID.

    A row lists every seed's raw / palette FID, TV and iterations, the means, density / coverage (means) and
    the ratio of the means to the baseline's. By default the runs of one budget each (not checkpointed);
    `budget_s` takes the runs at that budget instead, checkpointed ones included (one record per seed each)."""
    by_recipe: dict[str, dict[int, dict[str, Any]]] = {}
    for r in records:
        at_budget = not r.get("checkpointed") if budget_s is None else r.get("budget_s") == budget_s
        if "eval" in r and at_budget:
            by_recipe.setdefault(r["recipe"], {})[r["seed"]] = r["eval"] | {"iterations": r["iterations"]}
    mean = lambda runs, key: statistics.mean(e[key] for e in runs.values())  # noqa: E731
    if baseline not in by_recipe:
        raise ValueError(f"no scored run of {baseline!r} in the results given; pick one of {sorted(by_recipe)}")
    base = by_recipe[baseline]
    lines = ["| recipe | " + " | ".join(f"seed {s}: raw / palette, TV, iterations" for s in sorted(base))
             + " | mean raw / palette | density / coverage (mean) | vs baseline raw / palette |",
             "|---|" + "---|" * len(base) + "---:|---:|---:|"]
    for recipe, runs in sorted(by_recipe.items(), key=lambda kv: (kv[0] != baseline, mean(kv[1], "fid_raw"))):
        if set(runs) != set(base):
            continue  # like for like: the baseline's seeds, no fewer
        cells = [f"{e['fid_raw']:.1f} / {e['fid_palette']:.1f}, {e['coverage_tv']:.3f}, {e['iterations']:,}"
                 for _, e in sorted(runs.items())]
        raw, palette = mean(runs, "fid_raw"), mean(runs, "fid_palette")
        scored = all("density" in e for e in runs.values())  # records before density/coverage lack them
        dc = f"{mean(runs, 'density'):.3f} / {mean(runs, 'coverage'):.3f}" if scored else "–"
        lines.append(f"| {recipe} | " + " | ".join(cells) + f" | {raw:.1f} / {palette:.1f} | {dc} | "
                     f"{raw / mean(base, 'fid_raw'):.2f}× / {palette / mean(base, 'fid_palette'):.2f}× |")
    return "\n".join(lines)


def plot_curves(records: list[dict[str, Any]], out: Path, recipes: list[str] | None = None) -> str:
    """FID against minutes of training, raw and with the palette, one line per recipe (mean over seeds,
    each seed a dot); writes the PNG and returns the same points as a markdown table.

    One run counts per recipe, seed and budget: the checkpointed (extended) run where there is one, else
    a plain run of that budget. `recipes` limits the plot to those."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen: dict[tuple[str, int, float], dict[str, Any]] = {}
    for r in sorted(records, key=lambda r: bool(r.get("checkpointed"))):  # checkpointed last: it wins
        if r.get("budget_s") and "eval" in r and (recipes is None or r["recipe"] in recipes):
            chosen[(r["recipe"], r["seed"], r["budget_s"])] = r
    points: dict[str, dict[float, list[dict[str, Any]]]] = {}
    for (recipe, _, budget_s), r in sorted(chosen.items()):
        points.setdefault(recipe, {}).setdefault(budget_s / 60, []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    rows = ["| recipe | minutes | seeds | iterations (mean) | FID raw, mean (range) | FID palette, mean (range) | TV |",
            "|---|---:|---|---:|---:|---:|---:|"]
    for recipe, by_minutes in sorted(points.items()):
        minutes = sorted(by_minutes)
        for ax, key in zip(axes, ("fid_raw", "fid_palette"), strict=True):
            means = [statistics.mean(r["eval"][key] for r in by_minutes[m]) for m in minutes]
            (line,) = ax.plot(minutes, means, marker="o", label=recipe)
            for m in minutes:
                ax.scatter([m] * len(by_minutes[m]), [r["eval"][key] for r in by_minutes[m]], s=12,
                           color=line.get_color(), alpha=0.5)
        for m in minutes:
            runs = by_minutes[m]
            rows.append(f"| {recipe} | {m:.0f} | {', '.join(str(r['seed']) for r in runs)} | "
                        f"{statistics.mean(r['iterations'] for r in runs):.0f} | "
                        f"{spread([r['eval']['fid_raw'] for r in runs])} | "
                        f"{spread([r['eval']['fid_palette'] for r in runs])} | "
                        f"{spread([r['eval']['coverage_tv'] for r in runs], 3)} |")
    for ax, title in zip(axes, ("drawn raw", "drawn with the 16-colour palette"), strict=True):
        ax.set_title(f"FID vs holdout, {title}", fontsize=10)
        ax.set_xlabel("minutes of training")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("FID (lower is better)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return "\n".join(rows)


def make_snapshot(holdout: int) -> None:
    from src.collect import collect_and_time, summary

    base = load_params()
    params = base.model_copy(update={"collect": base.collect.model_copy(update={"holdout_frames": holdout})})
    path, metrics = collect_and_time(params, STUDY_SNAPSHOT, progress=False)
    print(summary(metrics, len(params.collect.games), path))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    snap = sub.add_parser("snapshot", help="collect the study snapshot (params.yaml's collect, smaller holdout)")
    snap.add_argument("--holdout", type=int, default=HOLDOUT_FRAMES)
    run = sub.add_parser("run", help="train and score recipes")
    run.add_argument("recipes", nargs="+", choices=sorted(RECIPES))
    run.add_argument("--seed", type=int, action="append", help="repeatable; default 0")
    run.add_argument("--budget-s", type=float, default=600.0, help="seconds of training per run")
    run.add_argument("--fid-every", type=int, default=500)
    run.add_argument("--fid-samples", type=int, default=250)
    run.add_argument("--samples", type=int, default=2048, help="generated screens for the final FID/KID")
    run.add_argument("--iterations", type=int, default=None,
                     help="train this many steps instead of --budget-s seconds (to replay a CPU budget elsewhere)")
    run.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    run.add_argument("--inception-weights", default=None,
                     help="InceptionV3 weights file (default: the torch hub cache, as evaluate uses)")
    run.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    run.add_argument("--checkpoints", default=None,
                     help="checkpoint each run in DIR/<recipe>-seed<N> and continue from it: rerun with a longer "
                          "--budget-s to extend the same run (records are named ...-<budget>s)")
    run.add_argument("--results-dir", default=str(RESULTS_DIR), help="where the run's json and grid go")
    rep = sub.add_parser("report", help="print the table from benchmarks/quality/*.json")
    rep.add_argument("--write", action="store_true", help="also write it into benchmarks/RESULTS.md")
    rep.add_argument("--curves", default=None, help="also list the FID-during-training points of this recipe")
    rep.add_argument("--yardstick", action="store_true",
                     help="print the like-for-like table of runs scored with the full evaluate metrics instead")
    rep.add_argument("--plot", default=None, help="print the time-to-quality table instead and draw it into this "
                                                  "PNG (runs with a --budget-s; an extended run wins)")
    rep.add_argument("--recipe", action="append",
                     help="with --plot or --against: only this recipe (repeatable; default all)")
    rep.add_argument("--against", default=None, metavar="RECIPE",
                     help="print each recipe against this one, seed by seed, instead (runs made as pairs)")
    rep.add_argument("--budget-s", type=float, default=None,
                     help="with --against: the runs at this --budget-s, checkpointed ones included (the curves' "
                          "points; by default the runs not checkpointed)")
    rep.add_argument("--block", default=None, help="with --write: the RESULTS.md block to write (default: the "
                                                   "table's own: quality-study, yardstick or time-to-quality)")
    rep.add_argument("--results-dir", action="append", help="where the runs' json files are (repeatable; default "
                                                            "benchmarks/quality)")
    args = parser.parse_args(argv)

    if args.command == "snapshot":
        make_snapshot(args.holdout)
    elif args.command == "run":
        if args.threads:
            torch.set_num_threads(args.threads)
        for seed in args.seed or [0]:
            for recipe in args.recipes:
                run_one(recipe, seed, args)
    else:
        records = load_records(*(args.results_dir or [RESULTS_DIR]))
        if args.plot:
            text, block = plot_curves(records, Path(args.plot), args.recipe), "time-to-quality"
        elif args.against:
            try:
                kept = [r for r in records if not args.recipe or r["recipe"] in {*args.recipe, args.against}]
                text, block = against(kept, args.against, args.budget_s), "against"
            except ValueError as exc:
                parser.error(str(exc))
        elif args.yardstick:
            text, block = yardstick(records), "yardstick"
        else:
            text, block = report(records), "quality-study"
            if args.curves:
                text += "\n\n" + fid_curves(records, args.curves)
        print(text)
        if args.write:
            write_block(args.block or block, text)


if __name__ == "__main__":
    main()
