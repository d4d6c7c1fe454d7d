"""How far a run is and the lr schedule that follows it (src/training/clock.py)."""

from __future__ import annotations

import pytest

from src.training.clock import cosine_scale, done_fraction, lr_scale


def test_lr_scale_is_linear_in_steps_or_time_whichever_ends_first():
    assert lr_scale(0, 100, 0.0, None) == 1.0
    assert lr_scale(25, 100, 0.0, None) == 0.75
    assert lr_scale(25, 100, 30.0, 60.0) == 0.5  # half the time budget spent, a quarter of the steps
    assert lr_scale(80, 100, 30.0, 60.0) == pytest.approx(0.2)
    assert lr_scale(100, 100, 99.0, 60.0) == 0.0


def test_done_fraction_follows_whichever_end_comes_first_and_stops_at_one():
    assert done_fraction(10, 1_000_000, 30.0, 60.0) == 0.5  # a budget long before the iteration count
    assert done_fraction(75, 100, 30.0, 600.0) == 0.75  # the iteration count before the budget
    assert done_fraction(10, 100, 90.0, 60.0) == 1.0  # overrun: never past the end
    assert done_fraction(40, 100, 1e9, None) == 0.4


def test_cosine_scale_falls_from_one_to_the_end_fraction():
    assert cosine_scale(0.0, 0.1) == 1.0
    assert cosine_scale(0.5, 0.1) == pytest.approx(0.55)
    assert cosine_scale(1.0, 0.1) == pytest.approx(0.1)
    assert cosine_scale(0.3, 1.0) == 1.0
