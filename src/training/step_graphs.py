"""Which kind of training step runs at step i, and CUDA-graph replay of the step, one captured graph per kind.

Lazy R1 (`train.r1_every` > 1) makes two kinds of step, as in StyleGAN2's phases that run every
`interval` minibatches: a plain step, and every r1_every-th step (from the first) one that adds the
penalties (R1, and R2 when `train.r2_gamma` > 0). A step's kind is a pure function of its index, so every
kind can be captured once and the step replays the graph of its kind. Each kind first runs `warmup` times
eagerly on a side stream (cuDNN picks its kernels, Adam creates its state, the double backward is seen
once), is captured at its next step and replayed at every later one. The graphs share their static
buffers - weights, Adam's state, the learning-rate tensors and the random generators' states, all created
before capture and updated in place - and keep private memory pools for their intermediates, so replaying
one never overwrites what the other keeps between steps.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch

from src.errors import UserError

PLAIN, R1 = "plain", "r1"
WARMUP, CAPTURE, REPLAY = "warm-up", "capture", "replay"


def step_kind(step: int, penalty_gamma: float, r1_every: int) -> str:
    """The kind of step `step` (0-based): R1/R2 on every r1_every-th step from the first, else plain.

    `penalty_gamma` is `train.penalty_gamma` (R1's and R2's gammas together; 0 = no penalty step).
    """
    return R1 if penalty_gamma > 0 and step % r1_every == 0 else PLAIN


def step_kinds(penalty_gamma: float, r1_every: int) -> tuple[str, ...]:
    """The kinds of step a run makes, in the order they first occur."""
    if penalty_gamma <= 0:
        return (PLAIN,)
    return (R1,) if r1_every == 1 else (R1, PLAIN)


class StepGraphs:
    """Runs each step of a kind as a warm-up, a capture or a replay of that kind's graph.

    `run(kind, fn)` calls `fn` (the step of that kind, which must read no Python state that changes
    between steps: a graph bakes it in) and returns its output. A replayed graph writes its output into
    the same tensor every time: copy it before the next step.
    """

    def __init__(self, device: torch.device, generators: list[torch.Generator], warmup: int):
        self.device, self.generators, self.warmup = device, generators, warmup
        self.seen: Counter[str] = Counter()  # steps of each kind so far
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[str, torch.Tensor] = {}

    def action(self, kind: str) -> str:
        """What this step of `kind` does, counted: the first `warmup` warm up, the next captures, later ones replay."""
        seen = self.seen[kind]
        self.seen[kind] += 1
        return WARMUP if seen < self.warmup else CAPTURE if seen == self.warmup else REPLAY

    def run(self, kind: str, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        action = self.action(kind)
        if action == REPLAY:
            self.graphs[kind].replay()
            return self.outputs[kind]
        if action == WARMUP:
            return self._on_side_stream(fn)
        return self._capture(kind, fn)

    def _on_side_stream(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Warm-up before capture runs on a side stream, as torch.cuda.graphs requires."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            out = fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        return out

    def _capture(self, kind: str, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Record one step of `kind` as a CUDA graph and run it (capture alone executes nothing).

        The generators are registered with every graph: each replay then draws new batches, noise and
        augmentations, and advances the generators by what its capture consumed.
        """
        graph = torch.cuda.CUDAGraph()
        for gen in self.generators:
            graph.register_generator_state(gen)
        try:
            torch.cuda.synchronize(self.device)
            with torch.cuda.graph(graph):
                out = fn()
        except RuntimeError as exc:
            raise UserError(f"train.cuda_graphs: capturing the training step ({kind}) failed ({exc}); "
                            "set train.cuda_graphs: false in params.yaml") from exc
        self.graphs[kind], self.outputs[kind] = graph, out
        graph.replay()
        return out


def graph_plan(cuda_graphs: bool, compile_: bool, penalty_gamma: float, r1_every: int, device: torch.device,
               world_size: int, warmup: int) -> tuple[bool, str]:
    """Whether the steps replay captured CUDA graphs, and the log line saying which path runs and why."""
    if device.type != "cuda":
        return False, f"training step: eager on {device.type} (train.cuda_graphs applies on CUDA only)"
    if not cuda_graphs:
        return False, "training step: eager (train.cuda_graphs: false)"
    if world_size > 1:
        return False, (f"training step: train.cuda_graphs needs one process, this run has {world_size} (DDP); "
                       "running eagerly")
    if compile_:
        return False, "training step: train.cuda_graphs needs train.compile: false; running eagerly"
    warm = f"captured after {warmup} eager warm-up steps of its kind"
    if len(step_kinds(penalty_gamma, r1_every)) == 1:
        return True, f"training step: one CUDA graph replayed at every step ({warm})"
    return True, (f"training step: two CUDA graphs, the plain step and the R1 step (every {r1_every}th), "
                  f"each replayed at the steps of its kind ({warm})")
