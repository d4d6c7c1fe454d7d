"""The training checkpoint: its fingerprint, reading and writing it, and the global RNG states it keeps.

A checkpoint (`checkpoints/train/checkpoint.pt`) holds everything needed to continue bit for bit
on CPU: models, optimisers, EMA, the sampler's and noise generator's states (per process), the
global torch/numpy/python RNG states, the step, the training seconds so far, loss/FID history and
the best-FID generator. It holds only tensors and plain data and is read with `weights_only=True`:
a file that would run code on loading is refused, never loaded.

It carries the settings that change the trained weights (and their digest, the fingerprint) plus
the snapshot's sha256: a checkpoint that does not match is ignored, and the log names the settings
that differ. `train.iterations` and `train.time_budget_s` are left out, so raising either continues
a run, except under a schedule that ends at them (`train.lr_decay: linear`, R1/R2's γ under
`train.gamma_end_fraction` < 1): there another value starts over. A checkpoint that has already
trained more iterations than asked for is refused.
FIDs measured with other FID settings (`fid_settings`) are not comparable: on resume they are
dropped, best generator included, rather than mixed when picking the best step.
The final checkpoint is kept on purpose: rerunning a finished run writes its outputs again without
training. Delete `checkpoints/train/` to start over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from src.atomic import UnsafeFileError, load_torch_plain, save_torch_atomic
from src.errors import UserError
from src.params import Params, TrainParams

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2  # 2: plain data only (loadable with weights_only=True), settings recorded
CHECKPOINT_NAME = "checkpoint.pt"
# Settings that change when or what is reported, never the weights: a checkpoint made with other
# values of these is resumed. Device and process count enter the fingerprint resolved.
NON_TRAINING_KEYS = ("device", "iterations", "time_budget_s", "log_every", "image_every", "checkpoint_every",
                     "fid_every", "fid_samples")
# Where the budget schedules (`TrainParams.budget_schedules`) end: under one of them these change every
# step's lr or gamma.
SCHEDULE_KEYS = ("iterations", "time_budget_s")


class CheckpointError(UserError):
    pass


def training_settings(params: Params, snapshot_sha256: str, device: torch.device, world_size: int) -> dict[str, Any]:
    """Everything that changes the trained weights (plain JSON data); equal settings may resume."""
    schedule = SCHEDULE_KEYS if params.train.budget_schedules else ()
    train = {k: v for k, v in params.train.model_dump().items() if k not in NON_TRAINING_KEYS or k in schedule}
    return {
        "format": CHECKPOINT_FORMAT,
        "seed": params.seed,
        "model": params.model.model_dump(),
        "train": train,
        "snapshot_sha256": snapshot_sha256,
        "device_type": device.type,
        "world_size": world_size,
    }


def fingerprint_of(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def training_fingerprint(params: Params, snapshot_sha256: str, device: torch.device, world_size: int) -> str:
    """A digest of `training_settings`; equal digests may resume."""
    return fingerprint_of(training_settings(params, snapshot_sha256, device, world_size))


def fid_settings(params: Params) -> dict[str, Any]:
    """What a training-time FID depends on beyond the fingerprint: FIDs are comparable only when these are equal."""
    return {"train.fid_samples": params.train.fid_samples, "evaluate.num_samples": params.evaluate.num_samples,
            "evaluate.inception_weights": params.evaluate.inception_weights,
            "evaluate.batch_size": params.evaluate.batch_size}


def checkpoint_path(checkpoint_dir: Path | None) -> Path | None:
    return Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None


def _flat(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict) and key in ("model", "train"):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def settings_changes(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """`train.lr_d 0.001 -> 0.002, another snapshot`: what differs between two `training_settings`."""
    if not isinstance(old, dict):
        return "settings not recorded"
    a, b = _flat(old), _flat(new)
    schedules = TrainParams.model_validate(new["train"]).budget_schedules
    changes = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") == b.get(key, "<unset>"):
            continue
        if key == "snapshot_sha256":
            changes.append("another snapshot")
        elif key in ("train.iterations", "train.time_budget_s") and schedules:
            changes.append(f"{key} {a.get(key, '<not in the fingerprint>')} -> {b.get(key)}, which the "
                           f"{' and '.join(schedules)} schedule ends at")
        else:
            changes.append(f"{key} {a.get(key, '<unset>')} -> {b.get(key, '<unset>')}")
    return ", ".join(changes)


def read_checkpoint(checkpoint_dir: Path | None, settings: dict[str, Any], iterations: int,
                    quiet: bool = False) -> dict[str, Any] | None:
    """The checkpoint in `checkpoint_dir` if it was made with `settings`; otherwise None, said why (unless `quiet`:
    a look ahead of the read that trains, which says it).

    Raises CheckpointError, changing nothing, for a file that is not plain data (it could run code)
    or is unreadable, and for a matching checkpoint that has trained more than `iterations`.
    """
    path = checkpoint_path(checkpoint_dir)
    if path is None or not path.is_file():
        return None
    start_over = f"delete {path.parent}/ (or move it away) to train from scratch"
    say = (lambda *args: None) if quiet else log.warning
    try:
        ckpt = load_torch_plain(path)
    except UnsafeFileError as exc:
        raise CheckpointError(f"refusing to load {path}: {exc}; nothing was loaded or changed. If this is not "
                              f"your checkpoint, or one from an older version of this project, {start_over}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        say("ignoring %s: not a checkpoint of this format; training starts from scratch and will overwrite it", path)
        return None
    if ckpt.get("fingerprint") != fingerprint_of(settings):
        say("ignoring checkpoint %s (iteration %s): it was made with other training params (%s); training starts "
            "from scratch and will overwrite it", path, ckpt.get("step"),
            settings_changes(ckpt.get("settings"), settings))
        return None
    step = int(ckpt["step"])
    if step > iterations:
        raise CheckpointError(
            f"the checkpoint {path} has already trained {step} iterations, more than train.iterations: {iterations} "
            f"asks for, so the outputs would not match the params; nothing was changed. Set train.iterations (or "
            f"profiles.<profile>.train.iterations, where the running profile sets it) to {step} or more to write "
            f"(or continue) that run, or {start_over}"
        )
    return ckpt


def write_checkpoint(path: Path, settings: dict[str, Any], state: dict[str, Any]) -> None:
    """`state` (step, elapsed_s, model, rng, histories, best, meta) plus format, settings and global RNGs."""
    save_torch_atomic(path, {"format": CHECKPOINT_FORMAT, "fingerprint": fingerprint_of(settings),
                             "settings": settings, **state, "global_rng": global_rng_state()})


def checkpoint_meta(checkpoint_dir: Path | None, settings: dict[str, Any], iterations: int) -> dict[str, Any]:
    """The caller's metadata (e.g. the MLflow run id) stored in a matching checkpoint, else {}.

    Raises what `read_checkpoint` raises, so a caller learns of a refused checkpoint before it starts anything.
    """
    ckpt = read_checkpoint(checkpoint_dir, settings, iterations, quiet=True) if checkpoint_dir else None
    return dict(ckpt.get("meta") or {}) if ckpt else {}


def last_good(ckpt_path: Path | None, step: int | None) -> str:
    """A sentence for error messages: which checkpoint a failed run leaves behind."""
    if ckpt_path is None:
        return "No checkpoint was being written (checkpoint_dir=None)"
    if step is None:
        return "No checkpoint had been written yet"
    return f"The last good checkpoint, {ckpt_path} (iteration {step}), is untouched"


def global_rng_state() -> dict[str, Any]:
    """torch/numpy/python RNG states as tensors and plain data (numpy's key array as an int64 tensor)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
