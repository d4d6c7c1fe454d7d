"""The GPU protocol's pure parts (benchmarks/gpu_study.py, benchmarks/bench_recipes.py): candidates keep the EMA
horizon in images, timed windows hold whole R1 periods, the table judges the floors from the runs it is given."""

from __future__ import annotations

import math

import pytest
import yaml

from benchmarks.bench_recipes import window_iterations
from benchmarks.gpu_study import batch_overrides, candidates, run_params, table
from src.params import TrainParams, parse_params
from tests.conftest import tiny
from tests.test_step_graphs import trainer_for


@pytest.mark.parametrize("batch", [64, 128])
def test_a_larger_batch_keeps_the_ema_horizon_in_images(batch):
    train = TrainParams(batch_size=32, ema_decay=0.999, ema_warmup=1000)
    over = batch_overrides(train, batch)
    half_life_images = lambda decay, b: math.log(0.5) / math.log(decay) * b  # noqa: E731
    assert over["train.batch_size"] == batch
    assert half_life_images(over["train.ema_decay"], batch) == pytest.approx(half_life_images(0.999, 32), rel=1e-3)
    assert over["train.ema_warmup"] * batch == 1000 * 32


def test_every_candidate_is_valid_params_over_the_gpu_profile(shipped_params_text):
    base = parse_params(yaml.safe_load(shipped_params_text))
    for name in candidates(base.train):
        params = run_params(base, name, seed=1, budget_s=90, device="cpu")
        assert (params.seed, params.train.time_budget_s, params.train.fid_every) == (1, 90, 0)
    assert run_params(base, "b64", 0, 90, "cpu").train.batch_size == 64


def test_timed_windows_hold_whole_r1_periods():
    lazy = trainer_for(tiny(r1_gamma=1.0, r1_every=4))
    assert [window_iterations(0.1, s, lazy) for s in (0.01, 0.9, 1.3)] == [4, 8, 12]
    assert window_iterations(0.1, 1.3, trainer_for(tiny(r1_gamma=0.0))) == 13


def run(recipe, seed, raw, palette, images_s):
    return {"recipe": recipe, "seed": seed, "step_path": "training step: x", "iterations": 1000,
            "images_per_s": images_s, "eval": {"fid_raw": raw, "fid_palette": palette, "coverage_tv": 0.01}}


def test_the_table_judges_the_floors_on_the_means_of_the_seeds():
    article = [run("article", 0, 200.0, 130.0, 8700), run("article", 1, 240.0, 150.0, 8800)]
    good = [run("default", 0, 80.0, 30.0, 10_000), run("default", 1, 90.0, 40.0, 10_500)]  # 0.39x, 0.25x
    text = table(article + good)
    assert "Floors" in text and "NOT met" not in text and "0.39×" in text and "0.25×" in text
    slow = [run("default", 0, 80.0, 30.0, 9_000), run("default", 1, 90.0, 40.0, 9_000)]
    assert table(article + slow).endswith("met, met, NOT met")
    assert "not judged" in table(good)
