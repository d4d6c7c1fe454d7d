"""Which budget runs here: the `profile` key (auto | cpu | gpu) resolved against this machine.

`params.yaml`'s own values are the full-scale (GPU) run; `profiles.cpu` holds the few values that make
the same pipeline finish on a laptop CPU. `auto` picks `gpu` when training would run on CUDA and `cpu`
otherwise. The stages load their params through `load_run_params()`, which says which profile it chose
and what it changed, so nothing differs silently by machine: the resolved values are what the stages log
to MLflow and write to `metrics/`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from src.params import Params, effective, load_params, with_profile

log = logging.getLogger(__name__)


def trains_on_cuda(train_device: str) -> bool:
    """Whether `train.device` puts training on a GPU on this machine."""
    if train_device == "cpu":
        return False
    if train_device.startswith("cuda"):
        return True
    import torch

    return torch.cuda.is_available()


def resolve_profile(params: Params) -> tuple[str, str]:
    """(profile name, why): `auto` becomes `gpu` or `cpu` from the training device."""
    if params.profile != "auto":
        return params.profile, "set in params.yaml"
    if trains_on_cuda(params.train.device):
        return "gpu", "auto: training runs on CUDA"
    return "cpu", "auto: no CUDA device for training"


def profile_changes(params: Params, name: str) -> dict[str, Any]:
    """`{"train.iterations": 2000, ...}`: the values profile `name` sets, as dotted keys."""
    return {f"{section}.{key}": value
            for section, values in params.profiles.get(name, {}).items() for key, value in values.items()}


def apply_profile(params: Params) -> Params:
    """`params` with the resolved profile's values applied; says which profile and what it set."""
    name, why = resolve_profile(params)
    told = ", ".join(f"{k}={v}" for k, v in profile_changes(params, name).items()) or "no changes"
    log.info("profile: %s (%s): %s", name, why, told)
    return with_profile(params, name)


def load_run_params(path: str | os.PathLike | None = None) -> Params:
    """params.yaml as it runs on this machine: profile applied, then `effective` (recipe, auto intervals)."""
    return effective(apply_profile(load_params(path)))
