"""The game classifier behind evaluate's coverage metrics: accurate on real screens, cached, refused when not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from src import coverage
from src.collect import collect_snapshot
from src.data import load_snapshot, write_snapshot
from src.params import CollectParams, Params

GAMES = ["Breakout-v4", "Pong-v4"]


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    params = Params(seed=0, collect=CollectParams(games=GAMES, train_frames=120, holdout_frames=40, shard_frames=60))
    return load_snapshot(collect_snapshot(params, tmp_path_factory.mktemp("cov") / "snapshot", workers=1, progress=False))


def test_classifier_labels_real_screens_and_is_cached_by_snapshot(snapshot, tmp_path, monkeypatch):
    classifier = coverage.game_classifier(snapshot, cache_dir=tmp_path)
    assert classifier.holdout_accuracy >= coverage.MIN_ACCURACY
    assert classifier.games == GAMES
    cached = list(tmp_path.glob(f"{snapshot.sha256[:32]}-v{coverage.CLASSIFIER_VERSION}.pt"))
    assert len(cached) == 1
    refit = coverage.fit(snapshot.train_images, snapshot.train_labels, GAMES)
    assert torch.equal(refit.weight, classifier.weight)  # deterministic: the same snapshot, the same model

    def no_fit(*args, **kwargs):
        raise AssertionError("refitted although cached")

    monkeypatch.setattr(coverage, "fit", no_fit)
    again = coverage.game_classifier(snapshot, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.predict(snapshot.holdout_images), classifier.predict(snapshot.holdout_images))


def test_shares_and_total_variation_see_a_missing_game(snapshot, tmp_path):
    classifier = coverage.game_classifier(snapshot, cache_dir=tmp_path)
    labels = np.asarray(snapshot.holdout_labels)
    expected = coverage.shares(labels, 2)
    assert expected.tolist() == [0.5, 0.5]
    everything = coverage.shares(classifier.predict(snapshot.holdout_images), 2)
    assert coverage.total_variation(everything, expected) == 0.0
    only_breakout = coverage.shares(classifier.predict(snapshot.holdout_images[labels == 0]), 2)
    assert only_breakout.tolist() == [1.0, 0.0]
    assert coverage.total_variation(only_breakout, expected) == 0.5


def test_refuses_a_classifier_that_cannot_tell_the_games_apart(tmp_path):
    rng = np.random.default_rng(0)
    noise = lambda n: rng.integers(0, 256, (n, 3, 64, 64), dtype=np.uint8)  # noqa: E731
    arrays = {"train_images": noise(60), "train_labels": rng.integers(0, 2, 60).astype(np.uint8),
              "holdout_images": noise(40), "holdout_labels": rng.integers(0, 2, 40).astype(np.uint8)}
    snap = load_snapshot(write_snapshot(tmp_path / "snapshot", arrays, {"games": GAMES}))
    with pytest.raises(coverage.CoverageError, match=r"labels only .* of the holdout frames right \(needs >= 99%\)"):
        coverage.game_classifier(snap, cache_dir=tmp_path / "cache")
    # Refused from the cache too, not only when first trained.
    with pytest.raises(coverage.CoverageError):
        coverage.game_classifier(snap, cache_dir=tmp_path / "cache")
    assert Path(tmp_path / "cache").is_dir()
