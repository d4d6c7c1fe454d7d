"""The lr schedule the clock drives (src/training/clock.py)."""

from __future__ import annotations


import pytest

from src.training.clock import lr_scale


def test_lr_scale_is_linear_in_steps_or_time_whichever_ends_first():
    assert lr_scale(0, 100, 0.0, None) == 1.0
    assert lr_scale(25, 100, 0.0, None) == 0.75
    assert lr_scale(25, 100, 30.0, 60.0) == 0.5  # half the time budget spent, a quarter of the steps
    assert lr_scale(80, 100, 30.0, 60.0) == pytest.approx(0.2)
    assert lr_scale(100, 100, 99.0, 60.0) == 0.0
