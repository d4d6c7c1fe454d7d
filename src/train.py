"""Stage `train`: the GAN training loop, its checkpoints and resume, its outputs and MLflow run.

`train_gan()` is the pure core that tests, the tuner and the benchmark call: it trains on a
snapshot with EFFECTIVE params and returns a `TrainResult`; it writes nothing but its checkpoint.
`main()` wires params.yaml -> snapshot -> `train_gan` -> `write_outputs` -> MLflow.

Speed: the snapshot is copied to the device once as uint8 (`DeviceSampler`); noise and
augmentation are drawn on the device; per-step losses stay on the device and are read (one sync)
only every `train.log_every` steps, at checkpoints, at FID steps and at the end. bf16 autocast,
channels_last, fused Adam (CUDA), torch.compile and CUDA-graph replay of the whole step are
switches in `train.*`.

One iteration = `d_steps` discriminator updates and one generator update. As in the article,
the generator's output of the last D step is reused (detached) by D and then by the G step.
"Images/s" counts real images drawn: batch_size x d_steps x processes per iteration.

Checkpoints (`checkpoints/train/checkpoint.pt`, not a DVC output since DVC deletes outputs before a
rerun) hold everything needed to continue bit for bit on CPU: models, optimisers, EMA, the
sampler's and noise generator's states (per process), the global torch/numpy/python RNG states,
the step, the training seconds so far, loss/FID history and the best-FID generator. They carry a
fingerprint of the params that change training plus the snapshot's sha256: a checkpoint that
does not match is ignored (and said so). The final checkpoint is kept on purpose: rerunning a
finished run writes its outputs again without training, and raising `train.iterations` or
`train.time_budget_s` continues it. Delete `checkpoints/train/` to start over.

Under `torchrun --nproc_per_node=N -m src.train` each process trains on its own batches (its own
seeds; `batch_size` is per process) with DistributedDataParallel; rank 0 writes checkpoints,
outputs and the MLflow run. Stop requests (signals, time budget) are agreed on by all ranks at
the next sync point.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import functools
import hashlib
import importlib.util
import inspect
import io
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from src.augment import diff_augment, parse_policy
from src.data import (
    DEFAULT_DIR,
    DeviceSampler,
    Snapshot,
    SnapshotError,
    load_snapshot,
    save_torch_atomic,
    write_json_atomic,
)
from src.device import DeviceError, resolve_device
from src.errors import UserError, run_cli
from src.models import Generator, build_models, model_kwargs, palette_of
from src.params import IMAGE_SHAPE, Params, effective, flatten, load_params

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
CHECKPOINT_DIR = Path("checkpoints/train")
CHECKPOINT_NAME = "checkpoint.pt"
MODELS_DIR = Path("models")
METRICS_FILE = Path("metrics/train.json")
PLOTS_DIR = Path("plots/train")
LOSS_KEYS = ("loss_g", "loss_d", "d_real", "d_fake")
GRID_SIZE = 64
# Settings that change when or what is reported, never the weights: a checkpoint made with other
# values of these is resumed. Device and process count enter the fingerprint resolved.
NON_TRAINING_KEYS = ("device", "iterations", "time_budget_s", "log_every", "image_every", "checkpoint_every",
                     "fid_every", "fid_samples")


class NonFiniteLossError(UserError):
    pass


class TrainingInterrupted(UserError):
    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


# --------------------------------------------------------------------------------------------
# Device and precision


def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic on this CPU (AVX512-BF16 or AMX); without it bf16 is emulated and slow."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `train.precision` on `device`; None means plain fp32."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    else:
        supported = cpu_has_bf16()
    if precision == "bf16":
        if device.type == "cuda" and not supported:
            name = torch.cuda.get_device_name(device)
            raise DeviceError(f"train.precision = 'bf16' but {name} has no bf16; set train.precision: auto or fp32")
        return torch.bfloat16
    return torch.bfloat16 if supported else None


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return "cpu"


def stream_seed(seed: int, rank: int, stream: int) -> int:
    """Independent seeds for each (process, random stream) from the one `seed` of params.yaml."""
    return int(np.random.SeedSequence([seed, rank, stream]).generate_state(1)[0])


# --------------------------------------------------------------------------------------------
# Losses and EMA


def discriminator_loss(kind: str, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """D's loss on real and fake logits (sums of the two halves, as in the article)."""
    real_logits, fake_logits = real_logits.float(), fake_logits.float()
    if kind == "bce":
        # The article's BCELoss(sigmoid(x), 1) + BCELoss(sigmoid(y), 0), in the logit form.
        return F.binary_cross_entropy_with_logits(
            real_logits, torch.ones_like(real_logits)
        ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    if kind == "hinge":
        return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()
    if kind == "wgan-gp":
        return fake_logits.mean() - real_logits.mean()
    raise ValueError(f"unknown loss {kind!r}")


def generator_loss(kind: str, fake_logits: torch.Tensor) -> torch.Tensor:
    fake_logits = fake_logits.float()
    if kind == "bce":
        # Non-saturating: G maximises log D(G(z)), the article's BCELoss(D(G(z)), 1).
        return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
    if kind in ("hinge", "wgan-gp"):
        return -fake_logits.mean()
    raise ValueError(f"unknown loss {kind!r}")


def gradient_penalty(
    discriminator: Callable[[torch.Tensor], torch.Tensor],
    real: torch.Tensor,
    fake: torch.Tensor,
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """Gulrajani et al. 2017: E[(||grad_x D(x)|| - 1)^2] at random points between real and fake."""
    alpha = torch.rand(real.size(0), 1, 1, 1, device=real.device, generator=gen)
    mixed = (alpha * real.float() + (1 - alpha) * fake.float()).detach().requires_grad_(True)
    out = discriminator(mixed)
    (grad,) = torch.autograd.grad(out.float().sum(), mixed, create_graph=True)
    return ((grad.float().flatten(1).norm(dim=1) - 1.0) ** 2).mean()


class EMA:
    """An exponential moving average of a model's parameters; buffers (BN statistics) are copied.

    The decay ramps linearly from 0 to `decay` over the first `warmup` updates, so the average
    does not stay anchored to the random initial weights (0 = full decay from the start).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: int = 0):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup

    def decay_at(self, updates: int) -> float:
        """The decay used by update number `updates` (1 for the first update)."""
        if self.warmup <= 0:
            return self.decay
        return self.decay * min(1.0, updates / self.warmup)

    @torch.no_grad()
    def update(self, model: nn.Module, updates: int) -> None:
        weight = 1.0 - self.decay_at(updates)
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), weight)
        for ema_buf, buf in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_buf.copy_(buf)


# --------------------------------------------------------------------------------------------
# One training step


def _ddp_kwargs() -> dict[str, Any]:
    """Each process keeps its own BN statistics: broadcasting rank 0's buffers before every forward
    would change, in place, tensors that the pending backward of D's two forward passes needs."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


class GANTrainer:
    """The models, optimisers and random streams of one run, and one training iteration.

    With `train.cuda_graphs` (CUDA, one process, no torch.compile) the first `GRAPH_WARMUP` steps
    run eagerly on a side stream, the next one is captured as a CUDA graph and every step after is
    one replay: the per-kernel CPU cost (cuDNN calls dominate it at batch 256) is paid once. The
    sampler's and the noise generator's states are registered with the graph, so every replay
    draws new batches, noise and augmentations; the EMA update runs eagerly after each replay
    because its decay changes during warm-up.
    """

    GRAPH_WARMUP = 3

    def __init__(
        self,
        params: Params,
        images: np.ndarray,
        device: torch.device,
        *,
        precision: torch.dtype | None,
        rank: int = 0,
        world_size: int = 1,
        labels: np.ndarray | None = None,
    ):
        self.params = params
        self.t = t = params.train
        self.device = device
        self.precision = precision
        self.latent_dim = params.model.latent_dim
        self.policy = parse_policy(t.augment)
        # Under torch.compile, inductor picks conv layouts itself; channels_last params there trip a
        # stride assertion in ConvTranspose's weight gradient (torch 2.11, CUDA).
        channels_last = t.channels_last and not t.compile
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once

        torch.manual_seed(params.seed)  # same initial weights in every process and every rerun
        generator, discriminator = build_models(params)
        self.conditional = generator.num_classes > 0
        if self.conditional:
            if labels is None or len(labels) != len(images):
                raise ValueError("a class-conditional model needs one game label per training frame")
            counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=generator.num_classes)
            generator.class_freq.copy_(torch.from_numpy(counts / counts.sum()))
        if generator.palette_size:
            generator.palette.copy_(palette_of(images, generator.palette_size))
        self.G = generator.to(device, memory_format=self.memory_format)
        self.D = discriminator.to(device, memory_format=self.memory_format)
        self.ema = EMA(self.G, t.ema_decay, t.ema_warmup) if t.ema_decay > 0 else None
        self.graphed = t.cuda_graphs and device.type == "cuda" and world_size == 1 and not t.compile
        if t.cuda_graphs and device.type == "cuda" and not self.graphed:
            log.warning("train.cuda_graphs needs one process and train.compile: false; running eagerly")
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_out: torch.Tensor | None = None
        self._warm_steps = 0
        adam: dict[str, Any] = {"betas": (t.beta1, t.beta2)}
        if device.type == "cuda":
            adam["fused"] = True
            adam["capturable"] = self.graphed  # step counters on the device, updated inside the graph
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=t.lr_g, **adam)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=t.lr_d, **adam)
        self._reset_lr()

        self.sampler = DeviceSampler(images, device, seed=stream_seed(params.seed, rank, 0),
                                     labels=labels if self.conditional else None)
        self.rng = torch.Generator(device=device)  # noise, augmentation and GP mixing
        self.rng.manual_seed(stream_seed(params.seed, rank, 1))

        g_run: nn.Module = self.G
        d_run: nn.Module = self.D
        if t.compile:
            g_run, d_run = torch.compile(g_run), torch.compile(d_run)
        self._d_for_g = d_run  # G step: D without DDP, its weights frozen, nothing to all-reduce
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [device.index] if device.type == "cuda" else None
            g_run = DDP(g_run, device_ids=ids, **_ddp_kwargs())
            d_run = DDP(d_run, device_ids=ids, **_ddp_kwargs())
        self._g_run, self._d_run = g_run, d_run
        self.step_count = 0

    @property
    def eval_generator(self) -> nn.Module:
        return self.ema.model if self.ema is not None else self.G

    def _reset_lr(self) -> None:
        """params.yaml's learning rates, as floats or, for a captured step that decays them, device tensors.

        A captured step bakes a float lr in; a device tensor can change between replays.
        """
        as_tensor = self.graphed and self.t.lr_decay != "none"
        for opt, lr in ((self.opt_g, self.t.lr_g), (self.opt_d, self.t.lr_d)):
            opt.param_groups[0]["lr"] = torch.tensor(lr, dtype=torch.float32, device=self.device) if as_tensor else lr

    def set_lr_scale(self, scale: float) -> None:
        """Both learning rates at `scale` times params.yaml's (the `train.lr_decay` schedule)."""
        for opt, lr in ((self.opt_g, self.t.lr_g), (self.opt_d, self.t.lr_d)):
            group = opt.param_groups[0]
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr * scale)
            else:
                group["lr"] = lr * scale

    def images_per_step(self, world_size: int) -> int:
        return self.t.batch_size * self.t.d_steps * world_size

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision is None:
            return contextlib.nullcontext()
        # A graph must not keep autocast's cached weight casts: they are freed after capture.
        return torch.autocast(self.device.type, dtype=self.precision, cache_enabled=not self.graphed)

    def _real(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        images, labels = self.sampler.sample_labelled(self.t.batch_size)
        return images.contiguous(memory_format=self.memory_format), labels

    def noise(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.latent_dim, 1, 1, device=self.device, generator=self.rng)

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        return diff_augment(x, self.policy, self.rng) if self.policy else x

    def step(self) -> torch.Tensor:
        """One iteration; returns (loss_g, loss_d, D(x), D(G(z))) on the device, without a sync.

        With CUDA graphs the returned tensor is overwritten by the next step: copy it before then.
        """
        if not self.graphed:
            losses = self._step()
        elif self._graph is not None:
            self._graph.replay()
            losses = self._graph_out
        elif self._warm_steps < self.GRAPH_WARMUP:
            self._warm_steps += 1
            losses = self._on_side_stream(self._step)
        else:
            losses = self._capture()
        self.step_count += 1
        if self.ema is not None:
            self.ema.update(self.G, self.step_count)
        return losses

    def _on_side_stream(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Warm-up before capture runs on a side stream, as torch.cuda.graphs requires."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            out = fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        return out

    def _capture(self) -> torch.Tensor:
        """Record one step as a CUDA graph and run it (capture alone executes nothing)."""
        graph = torch.cuda.CUDAGraph()
        for gen in (self.sampler.generator, self.rng):
            graph.register_generator_state(gen)
        try:
            torch.cuda.synchronize(self.device)
            with torch.cuda.graph(graph):
                out = self._step()
        except RuntimeError as exc:
            raise UserError(f"train.cuda_graphs: capturing the training step failed ({exc}); "
                            "set train.cuda_graphs: false in params.yaml") from exc
        self._graph, self._graph_out = graph, out
        graph.replay()
        return out

    def _step(self) -> torch.Tensor:
        t = self.t
        for k in range(t.d_steps):
            last = k == t.d_steps - 1
            real, labels = self._real()
            # Conditional: fakes are drawn for the real batch's games, so both sides share one game mix.
            cond = () if labels is None else (labels,)
            z = self.noise(t.batch_size)
            with self._autocast():
                with torch.set_grad_enabled(last):  # only the last fake batch feeds the G step
                    fake = self._g_run(z, *cond)
                real_in, fake_in = self._augment(real), self._augment(fake.detach())
                real_logits = self._d_run(real_in, *cond)
                fake_logits = self._d_run(fake_in, *cond)
                loss_d = discriminator_loss(t.loss, real_logits, fake_logits)
                if t.loss == "wgan-gp":
                    critic = functools.partial(self._d_run, labels=labels) if cond else self._d_run
                    loss_d = loss_d + t.gp_weight * gradient_penalty(critic, real_in, fake_in, self.rng)
            self.opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            self.opt_d.step()

        # G step. D's weights are frozen: no gradient is computed for them, none reaches opt_d.
        self.D.requires_grad_(False)
        try:
            with self._autocast():
                loss_g = generator_loss(t.loss, self._d_for_g(self._augment(fake), *cond))
            self.opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
        finally:
            self.D.requires_grad_(True)
        self.opt_g.step()
        with torch.no_grad():
            d_real = torch.sigmoid(real_logits.float()).mean()
            d_fake = torch.sigmoid(fake_logits.float()).mean()
            return torch.stack([loss_g.detach(), loss_d.detach(), d_real, d_fake])

    # Checkpoint state ----------------------------------------------------------------------
    def rng_state(self) -> dict[str, torch.Tensor]:
        return {"sampler": self.sampler.state_dict()["generator"], "noise": self.rng.get_state()}

    def load_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        self.sampler.load_state_dict({"generator": state["sampler"]})
        self.rng.set_state(state["noise"])

    def model_state(self) -> dict[str, Any]:
        return {
            "step": self.step_count,
            "generator": self.G.state_dict(),
            "discriminator": self.D.state_dict(),
            "ema": self.ema.model.state_dict() if self.ema is not None else None,
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
        }

    def load_model_state(self, state: dict[str, Any]) -> None:
        self.G.load_state_dict(state["generator"])
        self.D.load_state_dict(state["discriminator"])
        if self.ema is not None:
            self.ema.model.load_state_dict(state["ema"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self._reset_lr()  # the schedule, not the checkpoint, sets the next step's lr
        self.step_count = int(state["step"])

    def weights_finite(self) -> bool:
        tensors = [p.detach() for p in self.G.parameters()] + [p.detach() for p in self.D.parameters()]
        return bool(torch.stack([torch.isfinite(x).all() for x in tensors]).all())


# --------------------------------------------------------------------------------------------
# Checkpoints


def training_fingerprint(params: Params, snapshot_sha256: str, device: torch.device, world_size: int) -> str:
    """A digest of everything that changes the trained weights; equal digests may resume."""
    params = effective(params)
    train = {k: v for k, v in params.train.model_dump().items() if k not in NON_TRAINING_KEYS}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "seed": params.seed,
        "model": params.model.model_dump(),
        "train": train,
        "snapshot_sha256": snapshot_sha256,
        "device_type": device.type,
        "world_size": world_size,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def read_checkpoint(checkpoint_dir: Path | None, fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint in `checkpoint_dir` if it matches `fingerprint`; otherwise None, said why."""
    if checkpoint_dir is None:
        return None
    path = Path(checkpoint_dir) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    try:
        # Our own file, written by this module; it holds numpy/python RNG states, hence not weights_only.
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated or foreign file: training starts over and replaces it
        log.warning("ignoring unreadable checkpoint %s (%s); training starts from scratch", path, exc)
        return None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        log.warning("ignoring %s: not a checkpoint of this format; training starts from scratch", path)
        return None
    if ckpt.get("fingerprint") != fingerprint:
        log.warning(
            "ignoring checkpoint %s (iteration %s): it was made with other training params or another "
            "snapshot; training starts from scratch and will overwrite it",
            path,
            ckpt.get("step"),
        )
        return None
    return ckpt


def checkpoint_meta(checkpoint_dir: Path | None, fingerprint: str) -> dict[str, Any]:
    """The caller's metadata (e.g. the MLflow run id) stored in a matching checkpoint, else {}."""
    ckpt = read_checkpoint(checkpoint_dir, fingerprint) if checkpoint_dir else None
    return dict(ckpt.get("meta") or {}) if ckpt else {}


def _global_rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_global_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# The loop


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

    @property
    def eval_generator(self) -> nn.Module:
        """The generator to evaluate and sample from: the EMA copy when there is one."""
        return self.ema_generator if self.ema_generator is not None else self.generator


def check_snapshot(snapshot: Snapshot) -> None:
    """Refuse a snapshot the model cannot train on, before any work starts."""
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


def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _StopRequest:
    """SIGINT/SIGTERM set a flag the loop reads between steps; a second signal stops at once."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: stopping after this step and writing a checkpoint", signal.Signals(signum).name)

    @contextlib.contextmanager
    def installed(self, enabled: bool) -> Iterator[_StopRequest]:
        if not enabled or threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in old:
            signal.signal(s, self._handler)
        try:
            yield self
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)


class _Clock:
    """Training seconds: wall time since start plus earlier sessions, minus paused work."""

    def __init__(self, before: float):
        self.before = before
        self.start = time.perf_counter()
        self.paused = 0.0

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.start - self.paused

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - t0


class LossWindow:
    """Per-step losses kept on the device; `read` is the one host sync, averaged over processes."""

    def __init__(self, size: int, device: torch.device, world_size: int):
        self.buf = torch.zeros(size, len(LOSS_KEYS), device=device)
        self.n = 0
        self.world_size = world_size

    def add(self, row: torch.Tensor) -> None:
        self.buf[self.n].copy_(row)
        self.n += 1

    def read(self, *flags: bool) -> tuple[list[list[float]], list[bool]]:
        """(rows of this window, each flag OR-ed over all processes) in one transfer."""
        k = len(flags)
        flag_values = torch.tensor([float(f) for f in flags], device=self.buf.device)
        flat = torch.cat([self.buf[: self.n].flatten(), flag_values])
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(flat)
            flat[: flat.numel() - k] /= self.world_size
        values = flat.tolist()
        rows = [values[i * len(LOSS_KEYS) : (i + 1) * len(LOSS_KEYS)] for i in range(self.n)]
        self.n = 0
        return rows, [v > 0 for v in values[len(values) - k :]]


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


def train_gan(
    params: Params,
    snapshot: Snapshot,
    *,
    checkpoint_dir: Path | None,
    fid_fn: Callable[[int, nn.Module], float] | None = None,
    log_fn: Callable[[int, dict[str, float]], None] | None = None,
    image_fn: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    progress: bool = True,
    checkpoint_meta: dict[str, Any] | None = None,
) -> TrainResult:
    """Train a GAN on `snapshot` with `params` (the article recipe is applied here if selected).

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
    from src.sample import generate_images

    params = effective(params)
    t = params.train
    check_snapshot(snapshot)
    rank, world = _dist()
    device = resolve_device(t.device, int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else None)
    precision = resolve_precision(t.precision, device)
    if params.model.conditional and snapshot.games != params.collect.games:
        raise SnapshotError(
            f"model.conditional: the snapshot holds the games {snapshot.games} but collect.games is "
            f"{params.collect.games}; rebuild the snapshot with `dvc repro collect` (or `python -m src.collect`)"
        )
    trainer = GANTrainer(params, snapshot.train_images, device, precision=precision, rank=rank, world_size=world,
                         labels=snapshot.train_labels)
    fingerprint = training_fingerprint(params, snapshot.sha256, device, world)
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    fid_on = t.fid_every > 0 and (fid_fn is not None or world > 1)

    loss_history: list[dict[str, float]] = []
    fid_history: list[dict[str, float]] = []
    best: dict[str, Any] = {"fid": None, "step": None, "state": None}
    elapsed_before = 0.0
    last_ckpt_step: int | None = None
    ckpt = read_checkpoint(checkpoint_dir, fingerprint)
    if ckpt is not None:
        trainer.load_model_state(ckpt["model"])
        trainer.load_rng_state(ckpt["rng"][rank])
        _set_global_rng_state(ckpt["global_rng"])
        loss_history, fid_history, best = ckpt["loss_history"], ckpt["fid_history"], ckpt["best"]
        elapsed_before = float(ckpt["elapsed_s"])
        last_ckpt_step = trainer.step_count
        if rank == 0:
            log.info("resuming from %s at iteration %d (%.0f s trained)", ckpt_path, trainer.step_count, elapsed_before)
    del ckpt

    step = trainer.step_count
    window = LossWindow(max(1, min(t.log_every, t.iterations)), device, world)
    clock = _Clock(elapsed_before)
    last_means = dict(loss_history[-1]) if loss_history else {}
    last_means.pop("step", None)
    rate_mark = (step, clock.elapsed())
    stopper = _StopRequest()
    stopped_by = "iterations"
    budget = t.time_budget_s

    def save_checkpoint() -> None:
        nonlocal last_ckpt_step
        if not trainer.weights_finite():
            raise NonFiniteLossError(
                f"the weights became non-finite by iteration {step}; {_last_good(ckpt_path, last_ckpt_step)}. "
                "Lower train.lr_g / train.lr_d or set train.precision: fp32"
            )
        rng = [trainer.rng_state()]
        if world > 1:
            import torch.distributed as dist

            rng = [None] * world
            dist.all_gather_object(rng, trainer.rng_state())
        if rank == 0 and ckpt_path is not None:
            with clock.pause():
                save_torch_atomic(
                    ckpt_path,
                    {
                        "format": CHECKPOINT_FORMAT,
                        "fingerprint": fingerprint,
                        "step": step,
                        "elapsed_s": clock.elapsed(),
                        "model": trainer.model_state(),
                        "rng": rng,
                        "global_rng": _global_rng_state(),
                        "loss_history": loss_history,
                        "fid_history": fid_history,
                        "best": best,
                        "meta": checkpoint_meta or {},
                    },
                )
        last_ckpt_step = step

    def measure_fid() -> None:
        if rank == 0 and fid_fn is not None:
            with clock.pause(), _eval_mode(trainer.eval_generator) as gen:
                fid = float(fid_fn(step, gen))
                fid_history.append({"step": step, "fid": fid})
                if log_fn is not None:
                    log_fn(step, {"fid": fid})
                if math.isfinite(fid) and (best["fid"] is None or fid < best["fid"]):
                    best.update(fid=fid, step=step, state=_cpu_state(gen))
        if world > 1:
            import torch.distributed as dist

            dist.barrier()

    bar = _progress_bar(progress and rank == 0, step, t.iterations)
    grid_noise_seed = params.seed
    grid_rng = torch.Generator().manual_seed(stream_seed(params.seed, rank, 2))
    with stopper.installed(ckpt_path is not None), bar:
        over_budget = budget is not None and clock.elapsed() >= budget
        if over_budget:
            stopped_by = "time_budget"
        while step < t.iterations and not over_budget:
            if t.lr_decay == "linear":
                trainer.set_lr_scale(lr_scale(step, t.iterations, clock.elapsed(), budget))
            losses = trainer.step()
            step += 1
            window.add(losses)
            bar.update(1)
            signalled = stopper.signum is not None
            spent = budget is not None and clock.elapsed() >= budget
            due_ckpt = ckpt_path is not None and step % t.checkpoint_every == 0
            due_fid = fid_on and step % t.fid_every == 0
            final = step == t.iterations
            if rank == 0 and image_fn is not None and step % t.image_every == 0:
                with clock.pause(), torch.no_grad(), _eval_mode(trainer.eval_generator) as gen:
                    # Own random stream: logging images must not change the training batches.
                    pick = torch.randint(len(trainer.sampler), (GRID_SIZE,), generator=grid_rng)
                    real = trainer.sampler.images[pick.to(device)].cpu()
                    fake = generate_images(gen, GRID_SIZE, latent_dim=trainer.latent_dim, seed=grid_noise_seed,
                                           device=device)
                    image_fn(step, real, fake)
            if not (step % t.log_every == 0 or due_ckpt or due_fid or final or (world == 1 and (signalled or spent))):
                continue

            rows, (signalled, spent) = window.read(signalled, spent)
            for i, row in enumerate(rows):
                if not all(math.isfinite(v) for v in row):
                    bad = step - len(rows) + i + 1
                    values = ", ".join(f"{k}={v:.4g}" for k, v in zip(LOSS_KEYS, row, strict=True))
                    raise NonFiniteLossError(
                        f"non-finite loss at iteration {bad} ({values}); training stopped and no outputs were "
                        f"written. {_last_good(ckpt_path, last_ckpt_step)}. Lower train.lr_g / train.lr_d, "
                        "set train.precision: fp32, or try another train.loss"
                    )
            last_means = {k: float(np.mean([r[j] for r in rows])) for j, k in enumerate(LOSS_KEYS)}
            now = clock.elapsed()
            rate = (step - rate_mark[0]) * trainer.images_per_step(world) / max(now - rate_mark[1], 1e-9)
            rate_mark = (step, now)
            loss_history.append({"step": step, **last_means})
            if rank == 0:
                bar.set_postfix({"img/s": f"{rate:.0f}", "loss_g": f"{last_means['loss_g']:.3f}",
                                 "loss_d": f"{last_means['loss_d']:.3f}"}, refresh=False)
                if log_fn is not None:
                    with clock.pause():
                        log_fn(step, {**last_means, "images_per_s": rate})

            if signalled or spent:  # agreed by every process: all of them leave the loop at this step
                stopped_by = "signal" if signalled else "time_budget"
            finishing = final or stopped_by != "iterations"
            if due_fid or (fid_on and finishing and stopped_by != "signal"):
                measure_fid()
            if due_ckpt or (ckpt_path is not None and finishing):
                save_checkpoint()
            if stopped_by != "iterations":
                break

    if stopped_by == "signal":
        name = signal.Signals(stopper.signum).name if stopper.signum else "a signal to another process"
        raise TrainingInterrupted(
            f"training interrupted by {name} at iteration {step}; checkpoint written to {ckpt_path}. "
            "Rerun `python -m src.train` (or `dvc repro`) to continue from it",
            stopper.signum or signal.SIGTERM,
        )

    elapsed = clock.elapsed()
    trainer.G.eval()
    return TrainResult(
        generator=trainer.G,
        ema_generator=trainer.ema.model if trainer.ema is not None else None,
        discriminator=trainer.D,
        iterations=step,
        elapsed_s=elapsed,
        images_per_s=step * trainer.images_per_step(world) / elapsed if elapsed > 0 else 0.0,
        losses=last_means,
        loss_history=loss_history,
        fid_history=fid_history,
        best_fid=best["fid"],
        best_step=best["step"],
        best_state=best["state"],
        stopped_by=stopped_by,
        world_size=world,
        device=device_label(device),
        precision="bf16" if precision is torch.bfloat16 else "fp32",
    )


def lr_scale(step: int, iterations: int, elapsed_s: float, budget_s: float | None) -> float:
    """Linear decay: 1 at the start, 0 at whichever end comes first, the iteration count or the time budget.

    Under a time budget the schedule follows the clock, so a slower machine decays over fewer steps.
    """
    done = step / iterations
    if budget_s is not None:
        done = max(done, elapsed_s / budget_s)
    return max(0.0, 1.0 - done)


def _last_good(ckpt_path: Path | None, step: int | None) -> str:
    if ckpt_path is None:
        return "No checkpoint was being written (checkpoint_dir=None)"
    if step is None:
        return "No checkpoint had been written yet"
    return f"The last good checkpoint, {ckpt_path} (iteration {step}), is untouched"


class _NoBar:
    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int = 1) -> None:
        return None

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        return None


def _progress_bar(enabled: bool, initial: int, total: int) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="it", dynamic_ncols=True, mininterval=0.5)


# --------------------------------------------------------------------------------------------
# Outputs


def generator_payload(state: dict[str, torch.Tensor], params: Params, step: int, kind: str) -> dict[str, Any]:
    """What a generator file holds: enough to rebuild and run it without params.yaml."""
    params = effective(params)
    return {
        "kind": "generator",
        "variant": kind,
        "state_dict": state,
        "model": model_kwargs(params)["generator"],
        "latent_dim": params.model.latent_dim,
        "image_shape": list(IMAGE_SHAPE),
        "step": step,
        "params": flatten(params),
    }


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_csv_atomic(path: Path, fields: list[str], rows: list[dict[str, float]]) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _write_bytes_atomic(path, out.getvalue().encode())


def write_outputs(
    result: TrainResult,
    params: Params,
    snapshot: Snapshot,
    *,
    run_ids: dict[str, str | None] | None = None,
    root: Path = Path("."),
) -> dict[str, Path]:
    """Write the DVC outputs of the stage (models, metrics, plots), each file atomically."""
    from src.sample import generate_images, write_grid

    params = effective(params)
    root = Path(root)
    models, plots = root / MODELS_DIR, root / PLOTS_DIR
    written: dict[str, Path] = {}

    def save_generator(name: str, state: dict[str, torch.Tensor] | None, step: int) -> None:
        path = models / name
        if state is None:
            path.unlink(missing_ok=True)  # no stale file from an earlier run with other settings
            return
        save_torch_atomic(path, generator_payload(state, params, step, name.removesuffix(".pt")))
        written[name] = path

    save_generator("generator.pt", _cpu_state(result.generator), result.iterations)
    ema = result.ema_generator
    save_generator("generator_ema.pt", _cpu_state(ema) if ema is not None else None, result.iterations)
    save_generator("generator_best.pt", result.best_state, result.best_step or 0)
    save_torch_atomic(
        models / "discriminator.pt",
        {"kind": "discriminator", "state_dict": _cpu_state(result.discriminator),
         "model": model_kwargs(params)["discriminator"], "image_shape": list(IMAGE_SHAPE), "step": result.iterations},
    )
    written["discriminator.pt"] = models / "discriminator.pt"
    run_ids = run_ids or {}
    write_json_atomic(
        models / "run.json",
        {
            "mlflow_run_id": run_ids.get("run_id"),
            "mlflow_experiment_id": run_ids.get("experiment_id"),
            "params": params.model_dump(),
            "snapshot_sha256": snapshot.sha256,
            "eval_generator": "generator_ema.pt" if ema is not None else "generator.pt",
            "iterations": result.iterations,
            "world_size": result.world_size,
            "device": result.device,
        },
    )
    written["run.json"] = models / "run.json"

    metrics: dict[str, Any] = {
        "iterations": result.iterations,
        "elapsed_s": round(result.elapsed_s, 3),
        "images_per_s": round(result.images_per_s, 2),
        "stopped_by_time_budget": result.stopped_by == "time_budget",
        **{k: result.losses[k] for k in LOSS_KEYS if k in result.losses},
    }
    if result.best_fid is not None:
        metrics.update(best_fid=result.best_fid, best_step=result.best_step)
    write_json_atomic(root / METRICS_FILE, metrics)
    written["metrics"] = root / METRICS_FILE

    _write_csv_atomic(plots / "losses.csv", ["step", *LOSS_KEYS], result.loss_history)
    written["losses.csv"] = plots / "losses.csv"
    if result.fid_history:
        _write_csv_atomic(plots / "fid.csv", ["step", "fid"], result.fid_history)
        written["fid.csv"] = plots / "fid.csv"
    else:
        (plots / "fid.csv").unlink(missing_ok=True)
    device = next(result.eval_generator.parameters()).device
    with _eval_mode(result.eval_generator) as gen:
        images = generate_images(gen, GRID_SIZE, latent_dim=params.model.latent_dim, seed=params.seed, device=device)
    written["samples.png"] = write_grid(images, plots / "samples.png")
    return written


# --------------------------------------------------------------------------------------------
# MLflow


class _MlflowRun:
    """The stage's MLflow run: one per training, resumed with the training when params match."""

    def __init__(self, params: Params, snapshot: Snapshot, device: torch.device, world: int, resume_id: str | None):
        import mlflow
        from mlflow.tracking import MlflowClient

        from src import tracking

        self.experiment_id = tracking.setup()
        self.client = MlflowClient()
        flat = {k: str(v) for k, v in flatten(params).items()}
        run_id = resume_id if resume_id and self._same_params(resume_id, flat) else None
        tags = {
            **tracking.run_tags(),
            "snapshot_sha256": snapshot.sha256,
            "device": device_label(device),
            "recipe": params.train.recipe,
            "world_size": str(world),
        }
        if resume_id and run_id is None:
            tags["resumed_from_run"] = resume_id
        system = importlib.util.find_spec("psutil") is not None
        self.run = mlflow.start_run(run_id=run_id, experiment_id=self.experiment_id, tags=tags,
                                    log_system_metrics=system)
        self.run_id = self.run.info.run_id
        if run_id is None:
            mlflow.log_params(flatten(params))
        else:
            log.info("continuing MLflow run %s", run_id)

    def _same_params(self, run_id: str, flat: dict[str, str]) -> bool:
        try:
            logged = self.client.get_run(run_id).data.params
        except Exception:  # deleted run or another database
            return False
        return logged == flat

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(v)]
        self.client.log_batch(self.run_id, metrics=batch, synchronous=True)

    def log_images(self, step: int, real: torch.Tensor, fake: torch.Tensor) -> None:
        import mlflow
        from torchvision.utils import make_grid

        for key, batch in (("real", real), ("fake", fake)):
            grid = make_grid(batch, nrow=8, padding=2).permute(1, 2, 0).numpy()
            mlflow.log_image(grid, key=key, step=step)

    def finish(self, result: TrainResult, params: Params, written: dict[str, Path]) -> None:
        import mlflow
        import mlflow.pytorch

        final = {"images_per_s_overall": result.images_per_s, "train_seconds": result.elapsed_s}
        if result.best_fid is not None:
            final.update(best_fid=result.best_fid)
        self.log_metrics(result.iterations, final)
        for name in ("metrics", "losses.csv", "fid.csv", "samples.png"):
            if name in written:
                mlflow.log_artifact(str(written[name]), artifact_path="train")
        # Logged from a fresh CPU copy in fp32 and contiguous layout, so the exported model loads anywhere.
        gen = Generator(**model_kwargs(effective(params))["generator"])
        gen.load_state_dict(_cpu_state(result.eval_generator))
        gen.eval()
        # A batch of 4: torch.export would specialise a batch dimension of 1 and accept nothing else.
        example = torch.randn(4, params.model.latent_dim, 1, 1, generator=torch.Generator().manual_seed(0)).numpy()
        requirements = [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]
        mlflow.pytorch.log_model(gen, name="generator", input_example=example, pip_requirements=requirements)

    def end(self, status: str) -> None:
        import mlflow

        mlflow.end_run(status=status)


# --------------------------------------------------------------------------------------------
# Stage


def init_distributed(device_name: str) -> tuple[int, int]:
    """Join the torchrun process group when there is one: (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = effective(load_params())
    rank, world = init_distributed(params.train.device)
    tracker: _MlflowRun | None = None
    try:
        device = resolve_device(params.train.device, int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else None)
        snapshot = load_snapshot(DEFAULT_DIR, verify=rank == 0)
        check_snapshot(snapshot)
        fid_fn = None
        meta: dict[str, Any] = {}
        if rank == 0:
            if params.train.fid_every > 0:
                from src.fid import make_fid_fn

                fid_fn = make_fid_fn(snapshot, params, device)
            fingerprint = training_fingerprint(params, snapshot.sha256, device, world)
            resume_id = checkpoint_meta(CHECKPOINT_DIR, fingerprint).get("mlflow_run_id")
            tracker = _MlflowRun(params, snapshot, device, world, resume_id)
            meta = {"mlflow_run_id": tracker.run_id}
        result = train_gan(
            params,
            snapshot,
            checkpoint_dir=CHECKPOINT_DIR,
            fid_fn=fid_fn,
            log_fn=tracker.log_metrics if tracker else None,
            image_fn=tracker.log_images if tracker else None,
            progress=rank == 0,
            checkpoint_meta=meta,
        )
        if rank == 0 and tracker is not None:
            written = write_outputs(result, params, snapshot,
                                    run_ids={"run_id": tracker.run_id, "experiment_id": tracker.experiment_id})
            tracker.finish(result, params, written)
            tracker.end("FINISHED")
            tracker = None
            log.info("trained %d iterations in %.0f s (%.0f images/s); outputs in %s/, %s, %s/",
                     result.iterations, result.elapsed_s, result.images_per_s, MODELS_DIR, METRICS_FILE, PLOTS_DIR)
    except TrainingInterrupted as exc:
        if tracker is not None:
            tracker.end("KILLED")
            tracker = None
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(128 + exc.signum) from None
    finally:
        if tracker is not None:
            tracker.end("FAILED")
        if world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
