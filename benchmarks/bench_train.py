"""Training speed: the article's loop against ours, side by side in one run on one device.

(a) The article's loop exactly: live Breakout/AirRaid/Pong-v4 environments stepped by random
    agents through its InputWrapper and iterate_batches (np.mean filter), batch 16, fp32, the
    article's DCGAN with Sigmoid + BCELoss, and a `.item()` host sync every step for its logging.
(b) Our loop: `src.training.trainer.GANTrainer.step` (the step `train_gan` runs) on a frozen snapshot copied
    to the device once, losses read every `--log-every` steps, at the article's model and
    hyper-parameters (custom recipe: batch 64 on CPU, 256 on CUDA; precision auto, channels_last).

Timed windows of the two loops alternate (a, b, a, b, ...) after a warm-up of each, so a change in
machine load hits both alike; the table gives medians over `--repeats` windows and the ratio.
Floors (issue 3): CPU ratio >= 1.8; one H100: ours >= 30,000 images/s and >= 20x the article.

    python benchmarks/bench_train.py                       # CPU
    python benchmarks/bench_train.py --device cuda [--compile | --cuda-graphs]
    ... --write                                            # also update benchmarks/RESULTS.md

Needs torch, numpy, opencv, gymnasium, ale-py, pydantic and pyyaml; not mlflow/dvc/optuna. The
snapshot is random frames (speed does not depend on them). `benchmarks/bench_recipes.py` compares
params.yaml's default recipe with the article's recipe, both in our loop, on a GPU or a CPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.results_md import machine  # noqa: E402
from src.atomic import write_bytes_atomic  # noqa: E402
from src.device import resolve_device, resolve_precision  # noqa: E402
from src.models import Discriminator, Generator  # noqa: E402
from src.params import ARTICLE_MODEL, ARTICLE_TRAIN, Params, effective, parse_params  # noqa: E402
from src.training.trainer import GANTrainer  # noqa: E402
from src.training.window import LossWindow  # noqa: E402

ARTICLE_BATCH = 16
LATENT = 100
RESULTS = REPO / "benchmarks" / "RESULTS.md"
SECTION = "## Training speed"


# (a) The article's loop ------------------------------------------------------------------


def iterate_batches(envs, batch_size):
    batch = [e.reset()[0] for e in envs]
    env_gen = iter(lambda: random.choice(envs), None)
    while True:
        e = next(env_gen)
        action = e.action_space.sample()
        obs, reward, is_done, is_trunc, _ = e.step(action)
        if np.mean(obs) > 0.01:
            batch.append(obs)
        if len(batch) == batch_size:
            batch_np = np.array(batch, dtype=np.float32)
            yield torch.tensor(batch_np * 2.0 / 255.0 - 1.0)
            batch.clear()
        if is_done or is_trunc:
            e.reset()


class ArticleLoop:
    """The article's training loop, resumable in windows of iterations."""

    def __init__(self, device: torch.device):
        self.device = device
        from benchmarks.article import article_envs  # gymnasium and ale-py: only this side needs them

        self.batches = iterate_batches(article_envs(), ARTICLE_BATCH)
        # The article's networks: our Discriminator returns logits, so its Sigmoid goes back on.
        self.net_discr = nn.Sequential(Discriminator(64, activation="relu"), nn.Sigmoid()).to(device)
        self.net_gener = Generator(LATENT, 64).to(device)
        self.objective = nn.BCELoss()
        self.gen_optimizer = torch.optim.Adam(self.net_gener.parameters(), lr=1e-4, betas=(0.5, 0.999))
        self.dis_optimizer = torch.optim.Adam(self.net_discr.parameters(), lr=1e-4, betas=(0.5, 0.999))
        self.true_labels_v = torch.ones(ARTICLE_BATCH, device=device)
        self.fake_labels_v = torch.zeros(ARTICLE_BATCH, device=device)
        self.gen_losses: list[float] = []
        self.dis_losses: list[float] = []

    def run(self, iterations: int) -> None:
        for _ in range(iterations):
            batch_v = next(self.batches)
            gen_input_v = torch.FloatTensor(ARTICLE_BATCH, LATENT, 1, 1).normal_(0, 1).to(self.device)
            batch_v = batch_v.to(self.device)
            gen_output_v = self.net_gener(gen_input_v)

            self.dis_optimizer.zero_grad()
            dis_output_true_v = self.net_discr(batch_v)
            dis_output_fake_v = self.net_discr(gen_output_v.detach())
            dis_loss = self.objective(dis_output_true_v, self.true_labels_v) + self.objective(
                dis_output_fake_v, self.fake_labels_v
            )
            dis_loss.backward()
            self.dis_optimizer.step()
            self.dis_losses.append(dis_loss.item())

            self.gen_optimizer.zero_grad()
            dis_output_v = self.net_discr(gen_output_v)
            gen_loss_v = self.objective(dis_output_v, self.true_labels_v)
            gen_loss_v.backward()
            self.gen_optimizer.step()
            self.gen_losses.append(gen_loss_v.item())

    images_per_iteration = ARTICLE_BATCH


# (b) Our loop ------------------------------------------------------------------------------


class OurLoop:
    """`GANTrainer.step` with train_gan's device-side loss window, read every `train.log_every` steps
    and at the end of each timed window (so a short window syncs more often, never less). The
    snapshot is `frames` random frames, with random game labels for a conditional model (speed does not depend on
    them)."""

    def __init__(self, device: torch.device, params: Params, frames: int):
        self.params = params = effective(params)
        rng = np.random.default_rng(0)
        self.dtype = resolve_precision(params.train.precision, device)
        images = rng.integers(0, 256, (frames, 3, 64, 64), dtype=np.uint8)
        labels = rng.integers(0, len(params.collect.games), frames) if params.model.conditional else None
        self.trainer = GANTrainer(params, images, device, precision=self.dtype, labels=labels)
        self.log_every = params.train.log_every
        self.window = LossWindow(self.log_every, device, 1)
        self.images_per_iteration = self.trainer.images_per_step(1)
        self.last: list[float] = []

    def run(self, iterations: int) -> None:
        for i in range(1, iterations + 1):
            self.window.add(self.trainer.step())
            if i % self.log_every == 0 or i == iterations:
                rows, _ = self.window.read()
                self.last = rows[-1]


def article_model_params(device: torch.device, batch_size: int, precision: str, channels_last: bool,
                         compile_: bool, cuda_graphs: bool, log_every: int) -> Params:
    """The article's model and hyper-parameters in our loop, with this benchmark's speed switches."""
    train = {**ARTICLE_TRAIN, "recipe": "custom", "batch_size": batch_size, "precision": precision,
             "channels_last": channels_last, "compile": compile_, "cuda_graphs": cuda_graphs,
             "device": str(device), "log_every": log_every}
    # The model pinned too: params' own defaults (width 32, palette, minibatch std) are not the article's.
    return parse_params({"model": ARTICLE_MODEL, "train": train})


# Measuring ---------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(loop, iterations: int, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    loop.run(iterations)
    sync(device)
    return time.perf_counter() - t0


def measure(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    batch = args.batch_size or (256 if device.type == "cuda" else 64)
    torch.manual_seed(0)
    random.seed(0)
    article = ArticleLoop(device)
    ours = OurLoop(device, article_model_params(device, batch, args.precision, not args.no_channels_last,
                                                args.compile, args.cuda_graphs, args.log_every), args.frames)
    load_before = os.getloadavg()

    # Warm-up (oneDNN/cuDNN kernel choice, torch.compile), then size windows to ~window_s seconds.
    per_it = {}
    for name, loop in (("article", article), ("ours", ours)):
        timed(loop, args.warmup, device)
        per_it[name] = timed(loop, args.warmup, device) / args.warmup
    iters = {name: max(5, round(args.window_s / t)) for name, t in per_it.items()}

    rates: dict[str, list[float]] = {"article": [], "ours": []}
    for _ in range(args.repeats):
        for name, loop in (("article", article), ("ours", ours)):
            seconds = timed(loop, iters[name], device)
            rates[name].append(iters[name] * loop.images_per_iteration / seconds)
        print(f"  article {rates['article'][-1]:9.1f} img/s   ours {rates['ours'][-1]:9.1f} img/s", flush=True)
    return {
        "device": device,
        "batch": batch,
        "precision": "bf16" if ours.dtype is torch.bfloat16 else "fp32",
        "iters": iters,
        "rates": rates,
        "load": (load_before, os.getloadavg()),
        "machine": machine(device),
    }


def table(res: dict, args: argparse.Namespace) -> str:
    device = res["device"]
    med = {k: statistics.median(v) for k, v in res["rates"].items()}
    ratio = med["ours"] / med["article"]
    if device.type == "cuda":
        floor = f"ours >= 30,000 img/s and >= 20x: {'met' if med['ours'] >= 30_000 and ratio >= 20 else 'NOT met'}"
    else:
        floor = f"ratio >= 1.8x: {'met' if ratio >= 1.8 else 'NOT met'}"
    flags = (f"channels_last {'off' if args.no_channels_last else 'on'}, compile {'on' if args.compile else 'off'}, "
             f"CUDA graphs {'on' if args.cuda_graphs else 'off'}")
    (l1, l5, _), (a1, a5, _) = res["load"]
    lines = [
        f"### {'GPU' if device.type == 'cuda' else 'CPU'}",
        "",
        f"{dt.date.today().isoformat()} · {res['machine']} · load average (1/5 min) {l1:.2f}/{l5:.2f} before, "
        f"{a1:.2f}/{a5:.2f} after · `python benchmarks/bench_train.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        "| loop | batch | precision | images/s (median) | min – max | windows × iterations | vs article |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for name, label, batch, precision in (
        ("article", "article: live envs, fp32, `.item()` every step", ARTICLE_BATCH, "fp32"),
        ("ours", f"ours: snapshot on device, sync every {args.log_every} steps, {flags}", res["batch"],
         res["precision"]),
    ):
        rates = res["rates"][name]
        lines.append(
            f"| {label} | {batch} | {precision} | {med[name]:,.0f} | {min(rates):,.0f} – {max(rates):,.0f} | "
            f"{len(rates)} × {res['iters'][name]} | {med[name] / med['article']:.2f}× |"
        )
    lines += ["", f"Floor ({floor}). Same model (the article's DCGAN, 64 filters, latent 100) in both loops.", ""]
    return "\n".join(lines)


def write_section(markdown: str, path: Path = RESULTS) -> None:
    """Replace this device's subsection of "## Training speed" in RESULTS.md, leaving the rest alone."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    heading = markdown.splitlines()[0]
    if SECTION not in text:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\nWritten by `benchmarks/bench_train.py --write`.\n\n"
    start = text.index(SECTION)
    nxt = re.search(r"^## ", text[start + len(SECTION):], flags=re.M)
    end = start + len(SECTION) + nxt.start() if nxt else len(text)
    section = text[start:end]
    sub = re.search(rf"^{re.escape(heading)}\n.*?(?=^### |\Z)", section, flags=re.M | re.S)
    if sub:
        section = section[: sub.start()] + markdown + "\n" + section[sub.end():]
    else:
        section = section.rstrip("\n") + "\n\n" + markdown + "\n"
    text = text[:start] + section.rstrip("\n") + "\n" + ("\n" + text[end:] if end < len(text) else "")
    write_bytes_atomic(path, text.encode())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    parser.add_argument("--batch-size", type=int, default=None, help="our loop's batch (default 64 CPU, 256 CUDA)")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile our models")
    parser.add_argument("--cuda-graphs", action="store_true", help="replay our step as a CUDA graph")
    parser.add_argument("--log-every", type=int, default=50, help="our loop's sync interval (train.log_every)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for both loops (default: torch's); 1 is steadier on a shared box")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=10, help="warm-up iterations of each loop")
    parser.add_argument("--window-s", type=float, default=4.0, help="target seconds per timed window")
    parser.add_argument("--frames", type=int, default=8192, help="random frames in our snapshot")
    parser.add_argument("--write", action="store_true", help=f"update the section in {RESULTS.relative_to(REPO)}")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = measure(args)
    markdown = table(res, args)
    print(markdown)
    if args.write:
        write_section(markdown)
        print(f"updated {RESULTS}")


if __name__ == "__main__":
    main()
