"""The graph path of the training step (src/training/step_graphs.py): which kind of step runs at step i, when
each kind warms up, is captured and replays, which path a run takes, and that the functions a graph
captures are the eager step bit for bit. On CUDA (skipped without one): graphed vs eager training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import src.training.trainer as trainer_module
from src.params import effective
from src.training import GANTrainer
from src.training.step_graphs import CAPTURE, PLAIN, R1, REPLAY, WARMUP, StepGraphs, graph_plan, step_kind, step_kinds
from tests.conftest import tiny

CUDA = torch.device("cuda")


def trainer_for(params, device: torch.device = torch.device("cpu")) -> GANTrainer:
    images = np.random.default_rng(1).integers(0, 256, (32, 3, 64, 64), dtype=np.uint8)
    precision = torch.bfloat16 if params.train.precision == "bf16" else None
    return GANTrainer(effective(params), images, device, precision=precision)


def test_step_kind_is_r1_every_r1_every_th_step_from_the_first():
    assert [step_kind(i, 0.1, 4) for i in range(9)] == [R1, PLAIN, PLAIN, PLAIN, R1, PLAIN, PLAIN, PLAIN, R1]
    assert {step_kind(i, 0.1, 1) for i in range(5)} == {R1}
    assert {step_kind(i, 0.0, 4) for i in range(5)} == {PLAIN}
    assert (step_kinds(0.1, 16), step_kinds(0.1, 1), step_kinds(0.0, 16)) == ((R1, PLAIN), (R1,), (PLAIN,))


def test_each_kind_warms_up_then_is_captured_once_then_replays():
    graphs = StepGraphs(torch.device("cpu"), [], warmup=3)
    actions = [(step_kind(i, 0.1, 4), graphs.action(step_kind(i, 0.1, 4))) for i in range(20)]
    r1 = [a for k, a in actions if k == R1]  # steps 0, 4, 8, 12, 16
    plain = [a for k, a in actions if k == PLAIN]
    assert r1 == [WARMUP] * 3 + [CAPTURE, REPLAY]
    assert plain == [WARMUP] * 3 + [CAPTURE] + [REPLAY] * 11
    assert actions[5] == (PLAIN, CAPTURE) and actions[12] == (R1, CAPTURE)


def test_graph_plan_graphs_lazy_r1_on_one_cuda_process_and_says_which_path_runs():
    def plan(device=CUDA, world=1, cuda_graphs=True, compile_=False, r1_gamma=0.1, r1_every=16):
        return graph_plan(cuda_graphs, compile_, r1_gamma, r1_every, device, world, 3)

    graphed, line = plan()
    assert graphed and "two CUDA graphs" in line and "every 16th" in line
    for kwargs in ({"r1_every": 1}, {"r1_gamma": 0.0}):
        graphed, line = plan(**kwargs)
        assert graphed and "one CUDA graph replayed at every step" in line
    for kwargs, says in (({"world": 2}, "one process"), ({"compile_": True}, "train.compile: false"),
                         ({"cuda_graphs": False}, "train.cuda_graphs: false"),
                         ({"device": torch.device("cpu")}, "cpu")):
        graphed, line = plan(**kwargs)
        assert not graphed and "eager" in line and says in line, kwargs


def test_the_functions_a_graph_captures_equal_the_eager_step_bit_for_bit(monkeypatch):
    """Both kinds, fp32, same seed: B calls one function per kind, taken once (as a capture does) and with
    its step count never moving (a graph bakes in the Python state of its capture); A steps eagerly."""
    params = tiny(r1_gamma=1.0, r1_every=3, precision="fp32")
    eager, captured = trainer_for(params), trainer_for(params)
    penalties = []
    real_r1 = trainer_module.r1_penalty
    monkeypatch.setattr(trainer_module, "r1_penalty", lambda *a: penalties.append(1) or real_r1(*a))
    fns = dict(captured.step_fns)
    for i in range(7):  # R1 at 0, 3, 6: both kinds, each after the other
        want = eager.step()
        before = len(penalties)
        got = fns[step_kind(i, 1.0, 3)]()
        assert len(penalties) - before == (1 if i % 3 == 0 else 0)  # the R1 function adds it, the plain one not
        assert torch.equal(want, got), i
    assert captured.step_count == 0 and eager.step_count == 7
    for a, b in ((eager.G, captured.G), (eager.D, captured.D)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    for a, b in ((eager.opt_d, captured.opt_d), (eager.opt_g, captured.opt_g)):
        for sa, sb in zip(a.state.values(), b.state.values(), strict=True):
            assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(eager.rng.get_state(), captured.rng.get_state())
    assert torch.equal(eager.sampler.generator.get_state(), captured.sampler.generator.get_state())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI has none)")
@pytest.mark.parametrize("loss", [{}, {"loss": "rpgan", "r2_gamma": 1.0}], ids=["bce-r1", "rpgan-r1-r2"])
def test_graphed_training_matches_eager_on_cuda_for_both_kinds(loss):
    """bf16, lazy R1 every 2nd step: each kind warms up 3 times, is captured, then replays 3 times; the penalty's
    gamma halves after the captures (the `gamma_end_fraction` schedule), which the replays must follow."""
    settings = {"r1_gamma": 1.0, "r1_every": 2, "precision": "bf16", "device": "cuda", **loss}
    steps = 14  # 7 of each kind

    def run(trainer):
        rows = []
        for i in range(steps):
            if i == 10:
                trainer.set_gamma_scale(0.5)
            rows.append(trainer.step().clone())
        return torch.stack(rows).float().cpu()

    graphed = trainer_for(tiny(**settings), CUDA)
    eager = trainer_for(tiny(**settings, cuda_graphs=False), CUDA)
    assert graphed.graphed and not eager.graphed
    rows_graphed, rows_eager = run(graphed), run(eager)
    assert set(graphed.graphs.graphs) == {R1, PLAIN}
    assert graphed.graphs.seen == {R1: 7, PLAIN: 7}  # 3 warm-ups, 1 capture, 3 replays of each
    torch.testing.assert_close(rows_graphed, rows_eager, rtol=2e-2, atol=2e-2)
    for a, b in zip(graphed.G.state_dict().values(), eager.G.state_dict().values(), strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
    # Every replay drew new batches and noise: the generators moved exactly as in the eager run.
    assert torch.equal(graphed.sampler.generator.get_state(), eager.sampler.generator.get_state())
    assert torch.equal(graphed.rng.get_state(), eager.rng.get_state())
