"""The snapshot on disk: verified reads, atomic replacement, and the sampler that feeds training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

import src.data as data
from src.data import (
    MANIFEST,
    DeviceSampler,
    SnapshotError,
    array_files,
    load_snapshot,
    to_uint8,
    to_unit_range,
    write_snapshot,
)
from src.params import REPO_ROOT


def make_arrays(seed: int, n_train: int = 24, n_holdout: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, (n_train, 3, 64, 64), dtype=np.uint8),
        "train_labels": rng.integers(0, 3, n_train, dtype=np.uint8),
        "holdout_images": rng.integers(0, 256, (n_holdout, 3, 64, 64), dtype=np.uint8),
        "holdout_labels": rng.integers(0, 3, n_holdout, dtype=np.uint8),
    }


@pytest.fixture
def snapshot(tmp_path):
    arrays = make_arrays(0)
    path = write_snapshot(tmp_path / "snapshot", arrays, {"games": ["Breakout-v4", "AirRaid-v4", "Pong-v4"]})
    return path, arrays


def assert_snapshot_holds(path, arrays):
    snap = load_snapshot(path)
    for name, array in arrays.items():
        np.testing.assert_array_equal(getattr(snap, name), array)


def test_roundtrip_is_memory_mapped_and_listed(snapshot):
    path, arrays = snapshot
    snap = load_snapshot(path)
    assert_snapshot_holds(path, arrays)
    assert isinstance(snap.train_images, np.memmap)
    assert snap.games == ["Breakout-v4", "AirRaid-v4", "Pong-v4"]
    assert snap.image_shape == (3, 64, 64)
    assert sorted(snap.manifest["files"]) == sorted(array_files())
    assert sorted(p.name for p in path.iterdir()) == sorted([*array_files(), MANIFEST])
    assert not list(path.parent.glob(".snapshot.*")), "no temporary folders are left behind"


def test_same_content_same_digest(tmp_path, snapshot):
    path, arrays = snapshot
    again = write_snapshot(tmp_path / "again", arrays, {"games": ["x"]})
    assert load_snapshot(again).sha256 == load_snapshot(path).sha256
    other = write_snapshot(tmp_path / "other", make_arrays(1), {"games": ["x"]})
    assert load_snapshot(other).sha256 != load_snapshot(path).sha256


def test_flipped_byte_is_caught(snapshot):
    path, _ = snapshot
    file = path / "train_images.npy"
    raw = bytearray(file.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    file.write_bytes(bytes(raw))
    with pytest.raises(SnapshotError, match=r"train_images\.npy does not match its sha256.*dvc repro collect"):
        load_snapshot(path)
    # Without verification it opens (that is what verify=False is for), so the check above is the guard.
    load_snapshot(path, verify=False)


def test_truncated_file_is_caught(snapshot):
    path, _ = snapshot
    file = path / "holdout_images.npy"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(SnapshotError, match=r"holdout_images\.npy is \d+ bytes, the manifest says \d+ \(truncated\?\)"):
        load_snapshot(path)


def test_missing_file_is_caught(snapshot):
    path, _ = snapshot
    (path / "train_labels.npy").unlink()
    with pytest.raises(SnapshotError, match=r"train_labels\.npy is missing"):
        load_snapshot(path)


def test_missing_manifest_is_caught(snapshot):
    path, _ = snapshot
    (path / MANIFEST).unlink()
    with pytest.raises(SnapshotError, match=r"no snapshot at .*manifest\.json is missing"):
        load_snapshot(path)


@pytest.mark.parametrize(
    "corrupt",
    [lambda text: text[: len(text) // 2], lambda text: "[]", lambda text: json.dumps({"format_version": 1})],
    ids=["cut-json", "not-an-object", "no-files"],
)
def test_corrupt_manifest_is_caught(snapshot, corrupt):
    path, _ = snapshot
    manifest = path / MANIFEST
    manifest.write_text(corrupt(manifest.read_text()))
    with pytest.raises(SnapshotError, match=r"manifest\.json is unreadable"):
        load_snapshot(path)


def test_manifest_that_omits_an_array_is_caught(snapshot):
    path, _ = snapshot
    manifest = json.loads((path / MANIFEST).read_text())
    del manifest["files"]["holdout_labels.npy"]
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SnapshotError, match=r"does not list holdout_labels\.npy"):
        load_snapshot(path)


def test_other_format_version_is_caught(snapshot):
    path, _ = snapshot
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["format_version"] = 99
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SnapshotError, match="snapshot format 99"):
        load_snapshot(path)


def test_write_rejects_wrong_array_names(tmp_path):
    arrays = make_arrays(0)
    del arrays["holdout_labels"]
    with pytest.raises(ValueError, match="holdout_labels"):
        write_snapshot(tmp_path / "snapshot", arrays, {})
    assert not (tmp_path / "snapshot").exists()


def test_replacement_swaps_in_the_new_snapshot(snapshot):
    path, _ = snapshot
    new = make_arrays(7, n_train=10, n_holdout=4)
    write_snapshot(path, new, {"games": ["x"]})
    assert_snapshot_holds(path, new)
    assert not list(path.parent.glob(".snapshot.*"))


def test_failed_write_keeps_the_previous_snapshot(snapshot, monkeypatch):
    path, arrays = snapshot
    real_sha256 = data.file_sha256
    written = []

    def fail_on_third_file(file, *args, **kwargs):
        written.append(file.name)
        if len(written) == 3:
            raise OSError("disk full (simulated)")
        return real_sha256(file, *args, **kwargs)

    monkeypatch.setattr(data, "file_sha256", fail_on_third_file)
    with pytest.raises(OSError, match="simulated"):
        write_snapshot(path, make_arrays(1), {"games": ["new"]})
    monkeypatch.undo()
    assert len(written) == 3, "the write failed part-way, after some array files were written"
    assert_snapshot_holds(path, arrays)
    assert load_snapshot(path).games == ["Breakout-v4", "AirRaid-v4", "Pong-v4"]
    assert not list(path.parent.glob(".snapshot.*")), "the half-written folder is cleaned up"


KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import numpy as np
    import src.data as data

    out, ready = Path(sys.argv[1]), Path(sys.argv[2])
    real_sha256 = data.file_sha256

    def stall_after_first_file(file, *args, **kwargs):
        ready.write_text(file.name)  # one array file is on disk: the parent kills us now
        time.sleep(60)
        return real_sha256(file, *args, **kwargs)

    data.file_sha256 = stall_after_first_file
    rng = np.random.default_rng(1)
    arrays = {
        "train_images": rng.integers(0, 256, (50, 3, 64, 64), dtype=np.uint8),
        "train_labels": np.zeros(50, np.uint8),
        "holdout_images": rng.integers(0, 256, (10, 3, 64, 64), dtype=np.uint8),
        "holdout_labels": np.zeros(10, np.uint8),
    }
    data.write_snapshot(out, arrays, {"games": ["new"]})
    """
)


def test_sigkill_mid_write_keeps_the_previous_snapshot(snapshot, tmp_path):
    path, arrays = snapshot
    ready = tmp_path / "ready"
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(path), str(ready)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert child.poll() is None, "the writer exited before it was killed"
            assert time.monotonic() < deadline, "the writer never reached the middle of its write"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    leftover = path.parent / f".snapshot.tmp-{child.pid}"
    assert (leftover / ready.read_text()).exists(), "the kill did land mid-write"
    assert_snapshot_holds(path, arrays)
    # The next write succeeds and clears what the killed writer left behind.
    new = make_arrays(3)
    write_snapshot(path, new, {"games": ["next"]})
    assert_snapshot_holds(path, new)
    assert not leftover.exists()


def test_unit_range_roundtrip():
    levels = torch.arange(256, dtype=torch.uint8)
    unit = to_unit_range(levels)
    assert unit.dtype == torch.float32
    assert unit.min().item() == -1.0 and unit.max().item() == 1.0
    assert torch.equal(to_uint8(unit), levels)
    assert torch.equal(to_uint8(torch.tensor([-3.0, 3.0])), torch.tensor([0, 255], dtype=torch.uint8))


def sampler_images() -> np.ndarray:
    images = np.random.default_rng(0).integers(0, 256, (40, 3, 64, 64), dtype=np.uint8)
    images[0] = 0
    images[1] = 255
    return images


def test_device_sampler_range_and_shape():
    sampler = DeviceSampler(sampler_images(), "cpu", seed=0)
    assert len(sampler) == 40
    batches = torch.cat([sampler.sample_labelled(16)[0] for _ in range(20)])
    assert batches.shape == (320, 3, 64, 64) and batches.dtype == torch.float32
    assert batches.min().item() == -1.0 and batches.max().item() == 1.0


def test_device_sampler_is_deterministic_and_resumable():
    images = sampler_images()
    a, b, c = (DeviceSampler(images, "cpu", seed=s) for s in (5, 5, 6))
    first = [a.sample_labelled(8)[0] for _ in range(3)]
    assert all(torch.equal(x, b.sample_labelled(8)[0]) for x in first)
    assert not torch.equal(first[0], c.sample_labelled(8)[0])
    state = a.state_dict()
    expected = [a.sample_labelled(8)[0] for _ in range(3)]
    resumed = DeviceSampler(images, "cpu", seed=123)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, resumed.sample_labelled(8)[0]) for x in expected)
