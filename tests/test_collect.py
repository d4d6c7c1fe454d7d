"""The collect stage: deterministic, split-disjoint, equally shared, deduplicated frames."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import ale_py
import cv2
import gymnasium as gym
import numpy as np
import pytest

from src.collect import SPLITS, collect_frames, collect_snapshot, game_shares, shard_seed
from src.data import load_snapshot
from src.params import REPO_ROOT, CollectParams, Params
from src.rollout import CollectError, ShardTask, release_worker_state, run_shard, worker_env

TWO_GAMES = ["Breakout-v4", "Pong-v4"]


def make_params(seed: int = 1, **collect) -> Params:
    settings = {"games": TWO_GAMES, "train_frames": 160, "holdout_frames": 60, "shard_frames": 40, "dedup": False}
    return Params(seed=seed, collect=CollectParams(**{**settings, **collect}))


def digests(images: np.ndarray) -> list[bytes]:
    return [hashlib.sha256(frame.tobytes()).digest() for frame in images]


def file_hashes(path: Path) -> dict[str, str]:
    return {name: entry["sha256"] for name, entry in load_snapshot(path).manifest["files"].items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same params (with dedup and its top-up rounds) collected three times: 1, 2 and 2 workers."""
    root = tmp_path_factory.mktemp("runs")
    params = make_params(dedup=True)
    return {
        name: collect_snapshot(params, root / name, workers=workers, progress=False)
        for name, workers in (("one_worker", 1), ("two_workers", 2), ("two_workers_again", 2))
    }


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """Two games, no dedup: every played frame is kept, so the shards can be replayed one to one."""
    path = tmp_path_factory.mktemp("plain") / "snapshot"
    return load_snapshot(collect_snapshot(make_params(), path, workers=1, progress=False))


def folder_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_two_runs_give_identical_snapshots(runs):
    assert file_hashes(runs["two_workers"]) == file_hashes(runs["two_workers_again"])
    assert folder_bytes(runs["two_workers"]) == folder_bytes(runs["two_workers_again"])


def test_number_of_workers_does_not_change_the_snapshot(runs):
    # Byte for byte, manifest included: the same seed and params give DVC the same hash on any machine, so a
    # recollected snapshot invalidates nothing downstream (no time, date or worker count in it).
    assert file_hashes(runs["one_worker"]) == file_hashes(runs["two_workers"])
    assert folder_bytes(runs["one_worker"]) == folder_bytes(runs["two_workers"])


def test_other_seed_gives_other_frames(runs):
    other = collect_frames(make_params(seed=2, dedup=True), workers=1, progress=False)[0]
    assert not np.array_equal(other["train_images"], load_snapshot(runs["one_worker"]).train_images)


def test_dedup_leaves_no_exact_duplicates(runs):
    snap = load_snapshot(runs["one_worker"])
    for split in SPLITS:
        images, labels = getattr(snap, f"{split}_images"), getattr(snap, f"{split}_labels")
        for g in range(len(TWO_GAMES)):
            hashes = digests(images[labels == g])
            assert len(set(hashes)) == len(hashes), f"{TWO_GAMES[g]} {split} holds duplicate frames"
    stats = snap.manifest["per_game"]
    assert sum(s["duplicates_dropped"] for split in SPLITS for s in stats[split].values()) > 0
    assert snap.manifest["counts"] == {"train": {"Breakout-v4": 80, "Pong-v4": 80}, "holdout": {"Breakout-v4": 30, "Pong-v4": 30}}


def test_without_dedup_the_same_games_do_repeat_frames(plain):
    # The control for the test above: random-agent Breakout/Pong frames repeat exactly.
    hashes = digests(plain.train_images)
    assert len(set(hashes)) < len(hashes)


def test_train_and_holdout_seeds_are_disjoint(plain):
    seeds = plain.manifest["seeds"]
    assert seeds["train"] and seeds["holdout"]
    assert not set(seeds["train"]) & set(seeds["holdout"])
    keys = [(split, g, i) for split in SPLITS for g in range(3) for i in range(50)]
    assert len({shard_seed(0, *key) for key in keys}) == len(keys)


@pytest.mark.parametrize("fixture", ["plain", "runs"])
def test_holdout_shares_no_frame_with_training(fixture, request):
    """Content-disjoint splits, with dedup off (plain) and on (runs): zero holdout frames equal a training frame."""
    snap = request.getfixturevalue(fixture)
    snap = load_snapshot(snap["two_workers"]) if fixture == "runs" else snap
    train = set(digests(snap.train_images))
    shared = sum(h in train for h in digests(snap.holdout_images))
    assert shared == 0, f"{shared} holdout frames also occur in training"
    # The control: random rollouts of one game do replay training frames (episode starts), so the
    # collector had copies to drop, counted in the manifest and topped up to the full share.
    dropped = snap.manifest["holdout_train_duplicates_dropped"]
    per_game = snap.manifest["per_game"]["holdout"]
    assert dropped > 0 and dropped == sum(s["train_duplicates_dropped"] for s in per_game.values())
    assert snap.manifest["counts"]["holdout"] == {"Breakout-v4": 30, "Pong-v4": 30}


def test_frames_and_labels_match_their_shards(plain):
    """Replay every shard named in the manifest: each game's frames are exactly its shards' frames."""
    m = plain.manifest
    for split in SPLITS:
        images, labels = getattr(plain, f"{split}_images"), getattr(plain, f"{split}_labels")
        assert images.shape[1:] == (3, 64, 64) and images.dtype == np.uint8 and labels.dtype == np.uint8
        for g, game in enumerate(m["games"]):
            played = [
                run_shard(ShardTask(split, g, s["index"], game, s["seed"], s["steps"], "linear", 0.01, False)).frames
                for s in m["per_game"][split][game]["shards"]
            ]
            expected = np.concatenate(played)
            if split == "holdout":  # less the copies of training frames
                train = set(digests(plain.train_images))
                expected = expected[[d not in train for d in digests(expected)]]
            expected = expected[: m["counts"][split][game]]
            assert Counter(digests(images[labels == g])) == Counter(digests(expected)), f"{game} {split}"


def test_frames_are_shuffled_across_games(plain):
    labels = np.asarray(plain.train_labels)
    assert 0 < labels[: len(labels) // 2].mean() < 1, "the first half mixes both games"


def test_equal_share_per_game():
    assert game_shares(100, 3) == [34, 33, 33] and game_shares(20, 3) == [7, 7, 6] and sum(game_shares(7, 7)) == 7
    games = ["Breakout-v4", "AirRaid-v4", "Pong-v4"]
    arrays, manifest = collect_frames(
        make_params(games=games, train_frames=100, holdout_frames=20, shard_frames=60), workers=1, progress=False
    )
    assert np.bincount(arrays["train_labels"], minlength=3).tolist() == [34, 33, 33]
    assert np.bincount(arrays["holdout_labels"], minlength=3).tolist() == [7, 7, 6]
    assert manifest["counts"]["train"] == dict(zip(games, [34, 33, 33]))
    assert manifest["labels"] == {"0": "Breakout-v4", "1": "AirRaid-v4", "2": "Pong-v4"}


def test_linear_frames_are_the_article_wrapper_in_uint8():
    seed, steps = 11, 30
    result = run_shard(ShardTask("train", 0, 0, "Pong-v4", seed, steps, "linear", 0.01, False))
    gym.register_envs(ale_py)
    env = gym.make("Pong-v4")
    env.reset(seed=seed)
    env.action_space.seed(seed)
    expected = []
    for _ in range(steps):
        obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
        expected.append(np.moveaxis(cv2.resize(obs, (64, 64)), 2, 0))  # the article's InputWrapper
        if terminated or truncated:
            env.reset()
    env.close()
    assert result.frames.shape == (steps, 3, 64, 64) and result.frames.dtype == np.uint8
    np.testing.assert_array_equal(result.frames, np.stack(expected))


def test_interpolation_changes_the_frames():
    frames = {
        name: run_shard(ShardTask("train", 0, 0, "Breakout-v4", 3, 20, name, 0.01, False)).frames
        for name in ("linear", "area", "nearest", "cubic")
    }
    names = list(frames)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not np.array_equal(frames[a], frames[b]), f"{a} and {b} gave the same frames"


def test_dark_frame_filter_drops_nothing_at_the_article_threshold(plain):
    stats = plain.manifest["per_game"]
    assert all(s["dark_dropped"] == 0 for split in SPLITS for s in stats[split].values())
    assert plain.manifest["filters"] == {"min_mean": 0.01, "min_mean_on": "64x64 resized frame, 0..255", "dedup": False,
                                       "holdout_disjoint_from_train": True}


def test_dark_frame_filter_counts_what_it_drops():
    # AirRaid's frames average ~40 to ~70 (0..255): a threshold among them drops some, keeps some.
    result = run_shard(ShardTask("train", 0, 0, "AirRaid-v4", 5, 200, "linear", 50.0, False))
    assert 0 < result.dark < 200 and len(result.frames) == 200 - result.dark
    assert all(frame.mean() > 50.0 for frame in result.frames)


def test_a_reused_env_plays_like_a_fresh_one():
    # Workers keep one env per (split, game) and reseed it per shard: what it played before must not show.
    task = ShardTask("holdout", 0, 3, "Breakout-v4", 21, 60, "linear", 0.01, False)
    release_worker_state()
    fresh = run_shard(task).frames
    env = worker_env("holdout", "Breakout-v4")
    run_shard(ShardTask("holdout", 0, 4, "Breakout-v4", 22, 300, "linear", 0.01, False))  # another seed, far into a game
    reused = run_shard(task).frames
    assert worker_env("holdout", "Breakout-v4") is env, "the shards ran on the same env object"
    assert worker_env("train", "Breakout-v4") is not env, "train and holdout never share an env"
    release_worker_state()
    np.testing.assert_array_equal(reused, fresh)


def test_frames_dropped_by_the_filter_are_filled_in_shard_order(tmp_path):
    """Workers write frames into the rows planned for them; a dark frame makes the later ones move up."""
    params = make_params(games=["AirRaid-v4"], train_frames=120, holdout_frames=40, shard_frames=50, min_mean=50.0)
    arrays, m = collect_frames(params, workers=2, progress=False, scratch=tmp_path)
    assert not list(tmp_path.iterdir()), "the frame file is deleted; the arrays keep its mapping"
    for split in SPLITS:
        stats = m["per_game"][split]["AirRaid-v4"]
        assert stats["dark_dropped"] > 0 and len(stats["shards"]) > 1
        played = [run_shard(ShardTask(split, 0, s["index"], "AirRaid-v4", s["seed"], s["steps"], "linear", 50.0, False)).frames
                  for s in stats["shards"]]
        expected = np.concatenate(played)[: m["counts"][split]["AirRaid-v4"]]
        assert Counter(digests(arrays[f"{split}_images"])) == Counter(digests(expected)), split
    one = collect_frames(params, workers=1, progress=False, scratch=tmp_path)[0]
    for name, array in arrays.items():
        np.testing.assert_array_equal(one[name], array, err_msg=name)


def test_no_room_for_the_frame_file_fails_clearly(tmp_path, monkeypatch):
    def full_disk(fd, offset, size):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full_disk, raising=False)
    with pytest.raises(CollectError, match=r"cannot reserve 3 MB for the frames in .*No space left.*collect.train_frames"):
        collect_frames(make_params(), workers=1, progress=False, scratch=tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_killed_runs_frame_file_is_deleted_by_the_next_run(tmp_path):
    dead, alive = tmp_path / ".collect-999999999-x1.frames", tmp_path / f".collect-{os.getppid()}-x2.frames"
    dead.write_bytes(b"left by a killed run")
    alive.write_bytes(b"a running collect's")
    collect_frames(make_params(games=["Pong-v4"], train_frames=10, holdout_frames=5), workers=1, progress=False, scratch=tmp_path)
    assert sorted(tmp_path.iterdir()) == [alive]


def test_run_shard_results_do_not_share_memory():
    # Shards reuse a frame buffer inside a process; what run_shard returns must be the caller's own.
    a = run_shard(ShardTask("train", 0, 0, "Pong-v4", 1, 20, "linear", 0.01, False))
    kept = a.frames.copy()
    b = run_shard(ShardTask("train", 0, 1, "Pong-v4", 2, 20, "linear", 0.01, False))
    assert not np.shares_memory(a.frames, b.frames)
    np.testing.assert_array_equal(a.frames, kept)


def test_a_filter_that_drops_everything_fails_clearly(tmp_path):
    params = make_params(games=["Pong-v4"], train_frames=10, holdout_frames=5, shard_frames=20, min_mean=255)
    with pytest.raises(CollectError, match=r"Pong-v4 \((train|holdout)\): 20 env steps gave no new frame.*collect.min_mean"):
        collect_frames(params, workers=2, progress=False, scratch=tmp_path)
    assert not list(tmp_path.iterdir()), "the frame file is deleted on failure too"


def test_manifest_records_how_the_snapshot_was_made(plain):
    m = plain.manifest
    assert m["games"] == TWO_GAMES and m["seed"] == 1 and m["interpolation"] == "linear"
    assert m["env_ids"]["Pong-v4"]["id"] == "Pong-v4"
    assert set(m["versions"]) >= {"gymnasium", "ale-py", "opencv", "numpy"}
    for split in SPLITS:
        for game in TWO_GAMES:
            stats = m["per_game"][split][game]
            assert stats["env_steps"] == sum(s["steps"] for s in stats["shards"])
            assert stats["frames"] == m["counts"][split][game]


def run_cli_in(cwd: Path, params_text: str) -> subprocess.CompletedProcess:
    (cwd / "params.yaml").write_text(params_text)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "src.collect"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_cli_rejects_bad_params_in_one_line(tmp_path):
    done = run_cli_in(tmp_path, "collect:\n  train_frames: -5\n")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "collect.train_frames = -5" in lines[0]
    assert not (tmp_path / "data").exists()


def test_cli_writes_the_snapshot_and_a_summary(tmp_path):
    done = run_cli_in(
        tmp_path,
        "seed: 4\ncollect:\n  games: [AirRaid-v4]\n  train_frames: 30\n  holdout_frames: 10\n  workers: 1\n",
    )
    assert done.returncode == 0, done.stderr
    snap = load_snapshot(tmp_path / "data" / "snapshot")
    assert len(snap.train_images) == 30 and len(snap.holdout_images) == 10
    summary = done.stdout.strip().splitlines()
    assert len(summary) == 1 and summary[0].startswith("collect: 30 train + 10 holdout frames of 1 games")
    metrics = json.loads((tmp_path / "metrics" / "collect.json").read_text())
    assert metrics["frames"] == {"train": 30, "holdout": 10} and metrics["workers"] == 1
    assert metrics["env_steps"] == snap.manifest["env_steps"] >= 40 and metrics["collect_seconds"] > 0
    assert f"{metrics['env_steps']} env steps" in summary[0]
