"""Which torch device a setting names: one resolver for every stage and command."""

from __future__ import annotations

import torch

from src.errors import UserError


class DeviceError(UserError):
    pass


def resolve_device(name: str, local_rank: int | None = None, *, key: str = "train.device") -> torch.device:
    """`auto | cpu | cuda | cuda:N` -> a torch.device; under torchrun a CUDA run uses cuda:LOCAL_RANK.

    `key` names the setting in error messages (e.g. `evaluate.device`, `--device`).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if not name.startswith("cuda"):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"{key} = {name!r} but CUDA is not available here (torch {torch.__version__}); "
            f"set {key} to auto or cpu"
        )
    if local_rank is not None:
        return torch.device("cuda", local_rank)
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(
            f"{key} = {name!r} but only {torch.cuda.device_count()} CUDA device(s) exist; "
            "use cuda:0..cuda:N-1, cuda or auto"
        )
    return device
