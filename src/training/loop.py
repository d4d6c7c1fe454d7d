"""`train_gan`: the training loop around `GANTrainer`, from a snapshot and params to a `TrainResult`.

The loop owns what happens between steps: resuming from and writing checkpoints, reading the
losses (one host sync every `train.log_every` steps, at checkpoints, at FID steps and at the end),
FID measurement and best-step keeping, image logging, the progress bar, and the time budget and
stop signals. It writes nothing but its checkpoint; `src.training.outputs` writes the stage's files.
"""

from __future__ import annotations

import logging
import math
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from src.data import Snapshot, SnapshotError
from src.device import device_label, resolve_precision
from src.errors import UserError
from src.generator import GRID_SIZE, generate_images
from src.models import cpu_state, eval_mode
from src.params import IMAGE_SHAPE, Params, effective
from src.training.checkpoint import (
    checkpoint_path,
    fid_settings,
    last_good,
    read_checkpoint,
    set_global_rng_state,
    training_settings,
    write_checkpoint,
)
from src.training.clock import Clock, StopRequest, cosine_scale, done_fraction, lr_scale
from src.training.distributed import from_rank0, process_device, rank_and_world, stream_seed
from src.training.loss import LOSS_KEYS
from src.training.trainer import GANTrainer
from src.training.window import LossWindow

log = logging.getLogger(__name__)

FidFn = Callable[[int, nn.Module], float]
LogFn = Callable[[int, dict[str, float]], None]
ImageFn = Callable[[int, torch.Tensor, torch.Tensor], None]
BUDGET_BAR_TOTAL = 1000  # the progress bar's steps under a time budget (per mille of the run)


class NonFiniteLossError(UserError):
    pass


class TrainingInterrupted(UserError):
    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


@dataclass
class TrainResult:
    generator: nn.Module
    ema_generator: nn.Module | None
    discriminator: nn.Module
    iterations: int
    elapsed_s: float
    images_per_s: float
    losses: dict[str, float]
    loss_history: list[dict[str, float]] = field(default_factory=list)
    fid_history: list[dict[str, float]] = field(default_factory=list)
    best_fid: float | None = None
    best_step: int | None = None
    best_state: dict[str, torch.Tensor] | None = None
    stopped_by: str = "iterations"
    world_size: int = 1
    device: str = "cpu"
    precision: str = "fp32"
    seconds: dict[str, float] = field(default_factory=dict)  # this session: training, fid, checkpoints, logging

    @property
    def eval_generator(self) -> nn.Module:
        """The generator to evaluate and sample from: the EMA copy when there is one."""
        return self.ema_generator if self.ema_generator is not None else self.generator


def check_snapshot(snapshot: Snapshot, batch_size: int | None = None) -> None:
    """Refuse a snapshot the model cannot train on (or with batches of `batch_size`), before any work starts."""
    images = snapshot.train_images
    if tuple(images.shape[1:]) != IMAGE_SHAPE or images.dtype != np.uint8:
        raise SnapshotError(
            f"snapshot {snapshot.path} holds {images.dtype} images of shape {tuple(images.shape[1:])}, "
            f"but the model draws uint8 images of shape {IMAGE_SHAPE} (channels, height, width); "
            "rebuild it with `dvc repro collect` (or `python -m src.collect`)"
        )
    if len(images) == 0:
        raise SnapshotError(
            f"snapshot {snapshot.path} has no training frames; raise collect.train_frames and rebuild it"
        )
    if batch_size is not None and batch_size > len(images):
        raise SnapshotError(
            f"train.batch_size = {batch_size} is more than the snapshot's {len(images)} training frames: every "
            f"batch would repeat frames; lower train.batch_size to at most {len(images)} or raise collect.train_frames"
        )


def _check_games(params: Params, snapshot: Snapshot) -> None:
    if params.model.conditional and snapshot.games != params.collect.games:
        raise SnapshotError(
            f"model.conditional: the snapshot holds the games {snapshot.games} but collect.games is "
            f"{params.collect.games}; rebuild the snapshot with `dvc repro collect` (or `python -m src.collect`)"
        )


def train_gan(
    params: Params,
    snapshot: Snapshot,
    *,
    checkpoint_dir: Path | None,
    fid_fn: FidFn | None = None,
    log_fn: LogFn | None = None,
    image_fn: ImageFn | None = None,
    progress: bool = True,
    checkpoint_meta: dict[str, Any] | None = None,
) -> TrainResult:
    """Train a GAN on `snapshot` with `params` as they run (`src.params.effective`: recipe and `auto` applied).

    - `fid_fn(step, eval_generator) -> fid` runs every `train.fid_every` steps and at the end (the
      generator is in eval mode; its exceptions, e.g. optuna.TrialPruned, propagate). Lower is better;
      the best step's eval-generator weights are kept.
    - `log_fn(step, metrics)` receives loss_g, loss_d, d_real, d_fake (window means) and images_per_s
      at every sync point (every `train.log_every` steps, checkpoints, FID steps, the end).
    - `image_fn(step, real, fake)` receives two uint8 (64, 3, 64, 64) CPU batches every
      `train.image_every` steps: random snapshot frames (drawn from their own random stream, so
      logging does not change training) and the eval generator's images of 64 fixed noise vectors.
    - `checkpoint_dir`: where to checkpoint and resume from (None = neither; signals are left alone).
    Under an initialised torch.distributed process group, trains with DDP; only rank 0 calls the
    callbacks and writes the checkpoint. Training time excludes callbacks and checkpoint writing.
    """
    if effective(params) != params:  # resolved once, where the stage loads them
        raise ValueError("train_gan takes the params as they run: pass src.params.effective(params)")
    check_snapshot(snapshot, params.train.batch_size)
    rank, world = rank_and_world()
    device = process_device(params.train.device, world)
    precision = resolve_precision(params.train.precision, device)
    _check_games(params, snapshot)
    trainer = GANTrainer(params, snapshot.train_images, device, precision=precision, rank=rank, world_size=world,
                         labels=snapshot.train_labels)
    settings = training_settings(params, snapshot.sha256, device, world)
    run = _Run(params, trainer, rank=rank, world=world, ckpt_path=checkpoint_path(checkpoint_dir),
               settings=settings, fid_fn=fid_fn, log_fn=log_fn, image_fn=image_fn,
               meta=checkpoint_meta or {})
    # Only rank 0's machine is sure to hold the checkpoint (other nodes may be other machines).
    ckpt = read_checkpoint(checkpoint_dir, settings, params.train.iterations) if rank == 0 else None
    run.resume(from_rank0(ckpt) if world > 1 else ckpt)
    stopped_by = run.train(progress)
    if stopped_by == "signal":
        raise run.interrupted()
    return run.result(stopped_by)


class _Run:
    """One call of `train_gan`: the trainer plus everything that lives between its steps."""

    def __init__(self, params: Params, trainer: GANTrainer, *, rank: int, world: int, ckpt_path: Path | None,
                 settings: dict[str, Any], fid_fn: FidFn | None, log_fn: LogFn | None, image_fn: ImageFn | None,
                 meta: dict[str, Any]):
        self.params, self.t, self.trainer = params, params.train, trainer
        self.device = trainer.device
        self.rank, self.world = rank, world
        self.ckpt_path, self.settings, self.meta = ckpt_path, settings, meta
        self.fid_settings = fid_settings(params)
        self.fid_fn, self.log_fn, self.image_fn = fid_fn, log_fn, image_fn
        self.fid_on = self.t.fid_every > 0 and (fid_fn is not None or world > 1)
        self.loss_history: list[dict[str, float]] = []
        # Loss rows read at a sync between log steps (a checkpoint, FID or a signal): they join the next log step's
        # window, and travel in the checkpoint, so a resumed run logs the same means as an uninterrupted one.
        self.pending_rows: list[list[float]] = []
        self.fid_history: list[dict[str, float]] = []
        self.best: dict[str, Any] = {"fid": None, "step": None, "state": None}
        self.elapsed_before = 0.0
        self.last_ckpt_step: int | None = None
        self.stopper = StopRequest()

    def resume(self, ckpt: dict[str, Any] | None) -> None:
        """Continue from a matching checkpoint (None: from scratch); then start the clock."""
        if ckpt is not None:
            self.trainer.load_model_state(ckpt["model"])
            self.trainer.load_rng_state(ckpt["rng"][self.rank])
            set_global_rng_state(ckpt["global_rng"])
            self.loss_history, self.fid_history, self.best = ckpt["loss_history"], ckpt["fid_history"], ckpt["best"]
            self.pending_rows = list(ckpt.get("pending_loss_rows", []))
            if self.fid_history and ckpt["fid_settings"] != self.fid_settings:
                self._drop_incomparable_fids(ckpt["fid_settings"])
            self.elapsed_before = float(ckpt["elapsed_s"])
            self.last_ckpt_step = self.trainer.step_count
            if self.rank == 0:
                log.info("resuming from %s at iteration %d (%.0f s trained)", self.ckpt_path,
                         self.trainer.step_count, self.elapsed_before)
        self.step = self.first_step = self.trainer.step_count
        self.window = LossWindow(max(1, min(self.t.log_every, self.t.iterations)), self.device, self.world)
        self.clock = Clock(self.elapsed_before)
        self.last_means = dict(self.loss_history[-1]) if self.loss_history else {}
        self.last_means.pop("step", None)
        # Own random stream: logging images must not change the training batches.
        self.grid_rng = torch.Generator().manual_seed(stream_seed(self.params.seed, self.rank, 2))

    def _drop_incomparable_fids(self, then: dict[str, Any]) -> None:
        # A best step picked across FIDs of other sample counts or references would be meaningless.
        if self.rank == 0:
            changed = ", ".join(f"{k} {then.get(k)} -> {v}" for k, v in self.fid_settings.items() if then.get(k) != v)
            log.warning("the checkpoint's %d FIDs (best %s at iteration %s) were measured with other FID settings "
                        "(%s): not comparable with new ones, so they and their best generator are dropped",
                        len(self.fid_history), self.best["fid"], self.best["step"], changed)
        self.fid_history = []
        self.best = {"fid": None, "step": None, "state": None}

    def _spent(self) -> bool:
        return self.t.time_budget_s is not None and self.clock.elapsed() >= self.t.time_budget_s

    def train(self, progress: bool) -> str:
        """Step until the iteration count, the time budget or a signal; returns which one stopped it.

        The bar closes before the final FID and checkpoint, so what follows it is not counted as training.
        """
        from tqdm.auto import tqdm

        t = self.t
        # No tqdm rate: it would count FID pauses. img/s is training images per training second, as everywhere.
        # Under a time budget the bar counts towards whichever end comes first (in per mille), not to an
        # iteration count the budget may never reach; the iterations and seconds go in its postfix.
        counts = "{n_fmt}/{total_fmt} " if t.time_budget_s is None else ""
        bar = tqdm(total=t.iterations if t.time_budget_s is None else BUDGET_BAR_TOTAL, initial=self._bar_position(),
                   desc="train", unit="it", dynamic_ncols=True, mininterval=0.5,
                   disable=not (progress and self.rank == 0),
                   bar_format="{l_bar}{bar}| " + counts + "[{elapsed}<{remaining}{postfix}]")
        with self.stopper.installed(self.ckpt_path is not None):
            if self._spent():
                bar.close()
                return "time_budget"
            with bar:
                stopped_by = self._steps(bar)
            self._finish(stopped_by)
        # A signal during the last FID or checkpoint still ends the run as interrupted (its checkpoint is whole).
        return "signal" if self.stopper.signum is not None else stopped_by

    def _steps(self, bar: Any) -> str:
        t = self.t
        while self.step < t.iterations:
            if t.lr_decay == "linear":
                self.trainer.set_lr_scale(lr_scale(self.step, t.iterations, self.clock.elapsed(), t.time_budget_s))
            if t.gamma_scheduled:
                done = done_fraction(self.step, t.iterations, self.clock.elapsed(), t.time_budget_s)
                self.trainer.set_gamma_scale(cosine_scale(done, t.gamma_end_fraction))
            losses = self.trainer.step()
            self.step += 1
            self.window.add(losses)
            self._advance_bar(bar)
            stopped_by = self._after_step(bar)
            if stopped_by != "iterations":
                return stopped_by
        return "iterations"

    def _bar_position(self) -> int:
        t = self.t
        if t.time_budget_s is None:
            return self.step
        return round(BUDGET_BAR_TOTAL * done_fraction(self.step, t.iterations, self.clock.elapsed(), t.time_budget_s))

    def _advance_bar(self, bar: Any) -> None:
        bar.update(self._bar_position() - bar.n)  # redraws at most every mininterval

    def _after_step(self, bar: Any) -> str:
        """Log images, then, at a sync point, read the losses and measure/checkpoint what is due (the
        last step's FID and checkpoint are `_finish`'s)."""
        t, step = self.t, self.step
        signalled = self.stopper.signum is not None
        spent = self._spent()
        due_ckpt = self.ckpt_path is not None and step % t.checkpoint_every == 0
        due_fid = self.fid_on and step % t.fid_every == 0
        final = step == t.iterations
        if self.rank == 0 and self.image_fn is not None and step % t.image_every == 0:
            self._log_images()
        if not (step % t.log_every == 0 or due_ckpt or due_fid or final or (self.world == 1 and (signalled or spent))):
            return "iterations"
        signalled, spent = self._sync(bar, signalled, spent)
        if signalled or spent:  # agreed by every process: all of them leave the loop at this step
            return "signal" if signalled else "time_budget"
        if not final:
            if due_fid:
                self._measure_fid()
            if due_ckpt:
                self._save_checkpoint()
        return "iterations"

    def _finish(self, stopped_by: str) -> None:
        """The last step's FID (not after a signal, unless it was due anyway) and checkpoint."""
        if self.step == self.first_step:  # resumed at the end: nothing new to measure or save
            return
        if self.fid_on and (stopped_by != "signal" or self.step % self.t.fid_every == 0):
            self._measure_fid()
        if self.ckpt_path is not None:
            self._save_checkpoint()

    def _sync(self, bar: Any, signalled: bool, spent: bool) -> tuple[bool, bool]:
        """Read the loss window (the host sync), check it, log its means; the stop flags, agreed."""
        rows, (signalled, spent) = self.window.read(signalled, spent)
        self._check_finite(rows)
        rows = self.pending_rows + rows
        if not (self.step % self.t.log_every == 0 or self.step == self.t.iterations or spent):
            self.pending_rows = rows
            return signalled, spent
        self.pending_rows = []
        self.last_means = {k: float(np.mean([r[j] for r in rows])) for j, k in enumerate(LOSS_KEYS)}
        rate = self.images_per_s()
        self.loss_history.append({"step": self.step, **self.last_means})
        if self.rank == 0:
            budget = {} if self.t.time_budget_s is None else {
                "it": f"{self.step}/{self.t.iterations}", "s": f"{self.clock.elapsed():.0f}/{self.t.time_budget_s:g}"}
            bar.set_postfix({**budget, "img/s": f"{rate:.0f}", "loss_g": f"{self.last_means['loss_g']:.3f}",
                             "loss_d": f"{self.last_means['loss_d']:.3f}"}, refresh=False)
            if self.log_fn is not None:
                with self.clock.pause("logging"):
                    self.log_fn(self.step, {**self.last_means, "images_per_s": rate})
        return signalled, spent

    def images_per_s(self, elapsed: float | None = None) -> float:
        """The project's one images/s figure: training images over training seconds (FID, checkpoints
        and logging excluded), since the run began, earlier sessions included."""
        elapsed = self.clock.elapsed() if elapsed is None else elapsed
        return self.step * self.trainer.images_per_step(self.world) / elapsed if elapsed > 0 else 0.0

    def _check_finite(self, rows: list[list[float]]) -> None:
        for i, row in enumerate(rows):
            if not all(math.isfinite(v) for v in row):
                bad = self.step - len(rows) + i + 1
                values = ", ".join(f"{k}={v:.4g}" for k, v in zip(LOSS_KEYS, row, strict=True))
                raise NonFiniteLossError(
                    f"non-finite loss at iteration {bad} ({values}); training stopped and no outputs were "
                    f"written. {last_good(self.ckpt_path, self.last_ckpt_step)}. Lower train.lr_g / train.lr_d, "
                    "set train.precision: fp32, or try another train.loss"
                )

    def _log_images(self) -> None:
        trainer = self.trainer
        with self.clock.pause("logging"), torch.no_grad(), eval_mode(trainer.eval_generator) as gen:
            pick = torch.randint(len(trainer.sampler), (GRID_SIZE,), generator=self.grid_rng)
            real = trainer.sampler.images[pick.to(self.device)].cpu()
            fake = generate_images(gen, GRID_SIZE, latent_dim=trainer.latent_dim, seed=self.params.seed,
                                   device=self.device)
            self.image_fn(self.step, real, fake)

    def _measure_fid(self) -> None:
        if self.rank == 0 and self.fid_fn is not None:
            with self.clock.pause("fid"), eval_mode(self.trainer.eval_generator) as gen:
                fid = float(self.fid_fn(self.step, gen))
                self.fid_history.append({"step": self.step, "fid": fid})
                if self.log_fn is not None:
                    self.log_fn(self.step, {"fid": fid})
                if math.isfinite(fid) and (self.best["fid"] is None or fid < self.best["fid"]):
                    self.best.update(fid=fid, step=self.step, state=cpu_state(gen))
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def _save_checkpoint(self) -> None:
        trainer = self.trainer
        if not trainer.weights_finite():
            raise NonFiniteLossError(
                f"the weights became non-finite by iteration {self.step}; "
                f"{last_good(self.ckpt_path, self.last_ckpt_step)}. "
                "Lower train.lr_g / train.lr_d or set train.precision: fp32"
            )
        rng = [trainer.rng_state()]
        if self.world > 1:
            import torch.distributed as dist

            rng = [None] * self.world
            dist.all_gather_object(rng, trainer.rng_state())
        if self.rank == 0 and self.ckpt_path is not None:
            with self.clock.pause("checkpoints"):
                write_checkpoint(self.ckpt_path, self.settings, {
                    "step": self.step, "elapsed_s": self.clock.elapsed(), "model": trainer.model_state(),
                    "rng": rng, "loss_history": self.loss_history, "pending_loss_rows": self.pending_rows,
                    "fid_history": self.fid_history,
                    "best": self.best, "fid_settings": self.fid_settings, "meta": self.meta,
                })
        self.last_ckpt_step = self.step

    def interrupted(self) -> TrainingInterrupted:
        signum = self.stopper.signum
        name = signal.Signals(signum).name if signum else "a signal to another process"
        return TrainingInterrupted(
            f"training interrupted by {name} at iteration {self.step}; checkpoint written to {self.ckpt_path}. "
            "Rerun `python -m src.train` (or `dvc repro`) to continue from it",
            signum or signal.SIGTERM,
        )

    def result(self, stopped_by: str) -> TrainResult:
        # Resumed at the end, nothing trained: the run's own training time, not plus this call's few milliseconds.
        trainer = self.trainer
        elapsed = self.elapsed_before if self.step == self.first_step else self.clock.elapsed()
        trainer.G.eval()
        return TrainResult(
            generator=trainer.G,
            ema_generator=trainer.ema.model if trainer.ema is not None else None,
            discriminator=trainer.D,
            iterations=self.step,
            elapsed_s=elapsed,
            images_per_s=self.images_per_s(elapsed),
            losses=self.last_means,
            loss_history=self.loss_history,
            fid_history=self.fid_history,
            best_fid=self.best["fid"],
            best_step=self.best["step"],
            best_state=self.best["state"],
            stopped_by=stopped_by,
            world_size=self.world,
            device=device_label(self.device),
            precision="bf16" if trainer.precision is torch.bfloat16 else "fp32",
            seconds={"training": round(elapsed - self.elapsed_before, 1), **self.clock.paused.rounded()},
        )
