"""The training checkpoint: its fingerprint, reading and writing it, and the global RNG states it keeps.

A checkpoint (`checkpoints/train/checkpoint.pt`) holds everything needed to continue bit for bit
on CPU: models, optimisers, EMA, the sampler's and noise generator's states (per process), the
global torch/numpy/python RNG states, the step, the training seconds so far, loss/FID history and
the best-FID generator. It carries a fingerprint of the params that change training plus the
snapshot's sha256: a checkpoint that does not match is ignored (and said so). The final checkpoint
is kept on purpose: rerunning a finished run writes its outputs again without training, and
raising `train.iterations` or `train.time_budget_s` continues it. Delete `checkpoints/train/` to
start over.
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

from src.atomic import save_torch_atomic
from src.params import Params, effective

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
CHECKPOINT_NAME = "checkpoint.pt"
# Settings that change when or what is reported, never the weights: a checkpoint made with other
# values of these is resumed. Device and process count enter the fingerprint resolved.
NON_TRAINING_KEYS = ("device", "iterations", "time_budget_s", "log_every", "image_every", "checkpoint_every",
                     "fid_every", "fid_samples")


def training_fingerprint(params: Params, snapshot_sha256: str, device: torch.device, world_size: int) -> str:
    """A digest of everything that changes the trained weights; equal digests may resume."""
    params = effective(params)
    train = {k: v for k, v in params.train.model_dump().items() if k not in NON_TRAINING_KEYS}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "seed": params.seed,
        "model": params.model.model_dump(),
        "train": train,
        "snapshot_sha256": snapshot_sha256,
        "device_type": device.type,
        "world_size": world_size,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def checkpoint_path(checkpoint_dir: Path | None) -> Path | None:
    return Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None


def read_checkpoint(checkpoint_dir: Path | None, fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint in `checkpoint_dir` if it matches `fingerprint`; otherwise None, said why."""
    path = checkpoint_path(checkpoint_dir)
    if path is None or not path.is_file():
        return None
    try:
        # Our own file, written by this module; it holds numpy/python RNG states, hence not weights_only.
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated or foreign file: training starts over and replaces it
        log.warning("ignoring unreadable checkpoint %s (%s); training starts from scratch", path, exc)
        return None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        log.warning("ignoring %s: not a checkpoint of this format; training starts from scratch", path)
        return None
    if ckpt.get("fingerprint") != fingerprint:
        log.warning(
            "ignoring checkpoint %s (iteration %s): it was made with other training params or another "
            "snapshot; training starts from scratch and will overwrite it",
            path,
            ckpt.get("step"),
        )
        return None
    return ckpt


def write_checkpoint(path: Path, fingerprint: str, state: dict[str, Any]) -> None:
    """`state` (step, elapsed_s, model, rng, histories, best, meta) plus format, fingerprint and global RNGs."""
    save_torch_atomic(path, {"format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, **state,
                             "global_rng": global_rng_state()})


def checkpoint_meta(checkpoint_dir: Path | None, fingerprint: str) -> dict[str, Any]:
    """The caller's metadata (e.g. the MLflow run id) stored in a matching checkpoint, else {}."""
    ckpt = read_checkpoint(checkpoint_dir, fingerprint) if checkpoint_dir else None
    return dict(ckpt.get("meta") or {}) if ckpt else {}


def last_good(ckpt_path: Path | None, step: int | None) -> str:
    """A sentence for error messages: which checkpoint a failed run leaves behind."""
    if ckpt_path is None:
        return "No checkpoint was being written (checkpoint_dir=None)"
    if step is None:
        return "No checkpoint had been written yet"
    return f"The last good checkpoint, {ckpt_path} (iteration {step}), is untouched"


def global_rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
