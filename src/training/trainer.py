"""The models, optimisers and random streams of one run, and one training iteration (with CUDA-graph replay).

One iteration = `d_steps` discriminator updates and one generator update. As in the article,
the generator's output of the last D step is reused (detached) by D and then by the G step.
"Images/s" counts real images drawn: batch_size x d_steps x processes per iteration.

Speed: the snapshot is copied to the device once as uint8 (`DeviceSampler`); noise and
augmentation are drawn on the device; a step returns its losses on the device without a sync.
bf16 autocast, channels_last, fused Adam (CUDA), torch.compile and CUDA-graph replay of the whole
step are switches in `train.*`; `src.training.step_graphs` captures and replays the step, one graph per
kind of step (plain, and lazy R1's).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from src.augment import diff_augment, parse_policy
from src.data import DeviceSampler
from src.models import build_models, palette_of
from src.params import Params
from src.training.distributed import ddp_kwargs, stream_seed
from src.training.ema import EMA
from src.training.loss import discriminator_loss, generator_loss, gradient_penalty, r1_penalty
from src.training.step_graphs import R1, StepGraphs, graph_plan, step_kind, step_kinds

log = logging.getLogger(__name__)


class GANTrainer:
    """The models, optimisers and random streams of one run, and one training iteration.

    With `train.cuda_graphs` (CUDA, one process, no torch.compile) each kind of step (plain, lazy R1's)
    runs eagerly on a side stream for its first `GRAPH_WARMUP` steps, is captured as a CUDA graph at
    the next and replayed at every later step of its kind: the per-kernel CPU cost (cuDNN calls
    dominate it) is paid once. The sampler's and the noise generator's states are registered with
    both graphs, so every replay draws new batches, noise and augmentations; the EMA update runs
    eagerly after each step because its decay changes during warm-up.
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

        generator, discriminator = _initial_models(params, images, labels)
        self.conditional = generator.num_classes > 0
        self.G = generator.to(device, memory_format=self.memory_format)
        self.D = discriminator.to(device, memory_format=self.memory_format)
        self.ema = (EMA(self.G, t.ema_decay, t.ema_warmup, rampup=t.ema_rampup,
                        images_per_update=self.images_per_step(world_size)) if t.ema_decay > 0 else None)
        self.graphed, path = graph_plan(t.cuda_graphs, t.compile, t.penalty_gamma, t.r1_every, device, world_size,
                                        self.GRAPH_WARMUP)
        if rank == 0:  # which path runs; a warning when DDP or compile turns off the graphs asked for
            turned_off = t.cuda_graphs and device.type == "cuda" and not self.graphed
            log.log(logging.WARNING if turned_off else logging.INFO, path)
        adam: dict[str, Any] = {"betas": (t.beta1, t.beta2)}
        if device.type == "cuda":
            adam["fused"] = True
            adam["capturable"] = self.graphed  # step counters on the device, updated inside the graph
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=t.lr_g, **adam)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=t.lr_d, **adam)
        self._reset_lr()
        # R1/R2's gamma as a multiple of params.yaml's: a device tensor, so a captured step follows the schedule.
        self.gamma_scale = torch.ones((), device=device)

        self.sampler = DeviceSampler(images, device, seed=stream_seed(params.seed, rank, 0),
                                     labels=labels if self.conditional else None)
        self.rng = torch.Generator(device=device)  # noise, augmentation and GP mixing
        self.rng.manual_seed(stream_seed(params.seed, rank, 1))

        self._wrap_models(world_size)
        self.step_count = 0
        # What a graph captures: one step function per kind, reading no Python state that changes between steps.
        self.step_fns = {kind: functools.partial(self._step, kind == R1)
                         for kind in step_kinds(t.penalty_gamma, t.r1_every)}
        generators = [self.sampler.generator, self.rng]
        self.graphs = StepGraphs(device, generators, self.GRAPH_WARMUP) if self.graphed else None

    def _wrap_models(self, world_size: int) -> None:
        """The modules a step calls: G and D, compiled and/or wrapped in DDP as `train.*` asks."""
        g_run: nn.Module = self.G
        d_run: nn.Module = self.D
        if self.t.compile:
            g_run, d_run = torch.compile(g_run), torch.compile(d_run)
        self._d_for_g = d_run  # G step: D without DDP, its weights frozen, nothing to all-reduce
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            g_run = DDP(g_run, device_ids=ids, **ddp_kwargs())
            d_run = DDP(d_run, device_ids=ids, **ddp_kwargs())
        self._g_run, self._d_run = g_run, d_run
        # R1 and the WGAN gradient penalty differentiate D's input gradient, and torch.compile has no double
        # backward: they run D eagerly (the same weights; under DDP its gradients still reach the reducer).
        self._d_for_penalty = self.D if self.t.compile else d_run

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

    def set_gamma_scale(self, scale: float) -> None:
        """R1's and R2's gammas at `scale` times params.yaml's (the `train.gamma_end_fraction` schedule)."""
        self.gamma_scale.fill_(scale)

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
        kind = step_kind(self.step_count, self.t.penalty_gamma, self.t.r1_every)
        fn = self.step_fns[kind]
        losses = fn() if self.graphs is None else self.graphs.run(kind, fn)
        self.step_count += 1
        if self.ema is not None:
            self.ema.update(self.G, self.step_count)
        return losses

    def _step(self, regularise: bool) -> torch.Tensor:
        """One iteration of one kind: with the lazy R1/R2 penalties (`regularise`) or without."""
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
                critic = functools.partial(self._d_for_penalty, labels=labels) if cond else self._d_for_penalty
                if t.loss == "wgan-gp":
                    loss_d = loss_d + t.gp_weight * gradient_penalty(critic, real_in, fake_in, self.rng)
                if regularise and last:
                    # Lazy regularisation (StyleGAN2): every r1_every-th step, weighted r1_every times.
                    weight = self.gamma_scale * (t.r1_every / 2)
                    if t.r1_gamma > 0:
                        loss_d = loss_d + weight * t.r1_gamma * r1_penalty(critic, real_in)
                    if t.r2_gamma > 0:  # R2: the same penalty on the generated screens D just saw
                        loss_d = loss_d + weight * t.r2_gamma * r1_penalty(critic, fake_in)
            self.opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            self.opt_d.step()

        # G step. D's weights are frozen: no gradient is computed for them, none reaches opt_d.
        self.D.requires_grad_(False)
        try:
            with self._autocast():
                fake_for_g = self._d_for_g(self._augment(fake), *cond)
                real_for_g = None
                if t.loss == "rpgan":  # the pairs' real side, under D as it is now (a constant for G)
                    with torch.no_grad():
                        real_for_g = self._d_for_g(real_in, *cond)
                loss_g = generator_loss(t.loss, fake_for_g, real_for_g)
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


def _initial_models(params: Params, images: np.ndarray, labels: np.ndarray | None) -> tuple[nn.Module, nn.Module]:
    """G and D with their seeded initial weights, G's game mix and palette taken from the training frames."""
    torch.manual_seed(params.seed)  # same initial weights in every process and every rerun
    generator, discriminator = build_models(params)
    if generator.num_classes > 0:
        if labels is None or len(labels) != len(images):
            raise ValueError("a class-conditional model needs one game label per training frame")
        counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=generator.num_classes)
        generator.class_freq.copy_(torch.from_numpy(counts / counts.sum()))
    if generator.palette_size:
        generator.palette.copy_(palette_of(images, generator.palette_size))
    return generator, discriminator
