"""The frozen frame snapshot on disk, and the sampler that feeds training from it.

A snapshot is a folder of memory-mappable `.npy` arrays (uint8 frames, channels first, and their
game labels, for the `train` and `holdout` splits) plus `manifest.json`, which records how it was
made and the sha256 of every array file. `write_snapshot` builds it beside the target and swaps it
in, so an interrupted write never replaces a good snapshot; `load_snapshot` verifies every file
against the manifest before anything uses it, and `check_collect_params` refuses a snapshot
collected with other `seed`/`collect` settings than params.yaml has (it was not rebuilt).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from src.atomic import file_sha256, replacing_dir, write_json_atomic
from src.errors import UserError
from src.paths import SNAPSHOT_DIR, SPLITS

if TYPE_CHECKING:
    from src.params import Params

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class SnapshotError(UserError):
    pass


def array_files() -> list[str]:
    return [f"{split}_{kind}.npy" for split in SPLITS for kind in ("images", "labels")]


def write_snapshot(out_dir: Path, arrays: dict[str, np.ndarray], manifest: dict[str, Any]) -> Path:
    """Write `arrays` (named as in `array_files()`, without `.npy`) and the manifest, atomically.

    Everything is written to a sibling temporary folder first; only a complete, fsynced snapshot
    is renamed into place. The previous snapshot is removed only after the new one is in place.
    """
    out_dir = Path(out_dir)
    expected = {name.removesuffix(".npy") for name in array_files()}
    if set(arrays) != expected:
        raise ValueError(f"snapshot arrays must be exactly {sorted(expected)}, got {sorted(arrays)}")
    with replacing_dir(out_dir) as tmp:
        files = {}
        for name, array in arrays.items():
            path = tmp / f"{name}.npy"
            with open(path, "wb") as fh:
                np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
                fh.flush()
                os.fsync(fh.fileno())
            files[path.name] = {
                "sha256": file_sha256(path),
                "bytes": path.stat().st_size,
                "shape": list(array.shape),
                "dtype": str(array.dtype),
            }
        write_json_atomic(tmp / MANIFEST, {**manifest, "format_version": FORMAT_VERSION, "files": files})
    return out_dir


@dataclass(frozen=True)
class Snapshot:
    path: Path
    manifest: dict[str, Any]
    train_images: np.ndarray
    train_labels: np.ndarray
    holdout_images: np.ndarray
    holdout_labels: np.ndarray

    @property
    def games(self) -> list[str]:
        return list(self.manifest["games"])

    @property
    def sha256(self) -> str:
        """One digest for the whole snapshot: the hashes of its array files, in a fixed order."""
        files = self.manifest["files"]
        joined = "".join(f"{name}:{files[name]['sha256']};" for name in sorted(files))
        return hashlib.sha256(joined.encode()).hexdigest()

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.train_images.shape[1:])


def load_snapshot(path: Path = SNAPSHOT_DIR, verify: bool = True) -> Snapshot:
    """Open a snapshot memory-mapped; with `verify`, check every file's size and sha256 first."""
    path = Path(path)
    fix = "run `dvc repro collect` (or `python -m src.collect`) to rebuild it"
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise SnapshotError(f"no snapshot at {path} ({MANIFEST} is missing); {fix}")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise SnapshotError(f"{manifest_path} is unreadable ({exc}); {fix}") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise SnapshotError(
            f"{path} has snapshot format {manifest.get('format_version')!r}, expected {FORMAT_VERSION}; {fix}"
        )
    for name in array_files():
        file = path / name
        if name not in files:
            raise SnapshotError(f"{manifest_path} does not list {name}; {fix}")
        if not file.is_file():
            raise SnapshotError(f"{file} is missing; {fix}")
        if verify:
            size = file.stat().st_size
            if size != files[name]["bytes"]:
                raise SnapshotError(f"{file} is {size} bytes, the manifest says {files[name]['bytes']} (truncated?); {fix}")
            if file_sha256(file) != files[name]["sha256"]:
                raise SnapshotError(f"{file} does not match its sha256 in the manifest (altered or corrupt); {fix}")
    try:
        arrays = {name.removesuffix(".npy"): np.load(path / name, mmap_mode="r") for name in array_files()}
    except ValueError as exc:
        raise SnapshotError(f"{path} holds an unreadable array ({exc}); {fix}") from None
    return Snapshot(path=path, manifest=manifest, **arrays)


def _recorded(manifest: dict[str, Any]) -> dict[str, Any]:
    """The params a snapshot was collected with, as `src.collect` records them in its manifest.

    `collect.workers` is not among them: it does not change the frames. A manifest without a field
    (a snapshot not written by `src.collect`) cannot be checked on it.
    """
    counts, filters = manifest.get("counts", {}), manifest.get("filters", {})
    recorded = {
        "seed": manifest.get("seed"),
        "collect.games": manifest.get("games"),
        "collect.train_frames": sum(counts["train"].values()) if "train" in counts else None,
        "collect.holdout_frames": sum(counts["holdout"].values()) if "holdout" in counts else None,
        "collect.shard_frames": manifest.get("shard_frames"),
        "collect.interpolation": manifest.get("interpolation"),
        "collect.min_mean": filters.get("min_mean"),
        "collect.dedup": filters.get("dedup"),
    }
    return {k: v for k, v in recorded.items() if v is not None}


def collect_mismatches(params: Params, manifest: dict[str, Any]) -> list[str]:
    """One `collect.games: ['Pong-v4'] in the snapshot, [...] in params.yaml` per data-defining setting that differs."""
    now = {"seed": params.seed, **{f"collect.{k}": v for k, v in params.collect.model_dump().items()}}
    return [f"{key}: {value!r} in the snapshot, {now[key]!r} in params.yaml"
            for key, value in _recorded(manifest).items() if value != now[key]]


def check_collect_params(params: Params, snapshot: Snapshot) -> None:
    """Refuse a snapshot collected with other `seed`/`collect` settings than `params` (it would train on other data)."""
    mismatches = collect_mismatches(params, snapshot.manifest)
    if mismatches:
        raise SnapshotError(
            f"the snapshot at {snapshot.path} was collected with other settings than params.yaml has "
            f"({'; '.join(mismatches)}), so training would not learn the data the params describe. Rebuild it "
            "with `dvc repro collect` (or `python -m src.collect`), or set those params back"
        )


def to_unit_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 -1..1, as the article normalises (x * 2 / 255 - 1)."""
    return images_uint8.float().mul_(2.0 / 255.0).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float -1..1 (generator output) -> uint8 0..255, rounding to the nearest level."""
    return images.float().add(1.0).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)


class DeviceSampler:
    """Random training batches drawn on the training device from frames copied there once.

    The frames stay uint8 on the device (4x smaller than float); a batch is an on-device gather
    and normalisation, so no host-to-device copy or sync happens per step.
    """

    def __init__(self, images: np.ndarray, device: torch.device | str, seed: int, labels: np.ndarray | None = None):
        self.device = torch.device(device)
        # A real copy: snapshot arrays are read-only memory maps, which torch cannot wrap safely.
        self.images = torch.from_numpy(np.array(images, dtype=np.uint8, copy=True)).to(self.device)
        self.labels = None if labels is None else torch.from_numpy(np.array(labels, dtype=np.int64)).to(self.device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def __len__(self) -> int:
        return len(self.images)

    def sample_labelled(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A batch and its game labels (None when the sampler holds no labels); one random draw."""
        index = torch.randint(
            len(self.images), (batch_size,), device=self.device, generator=self.generator
        )
        return to_unit_range(self.images[index]), None if self.labels is None else self.labels[index]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
