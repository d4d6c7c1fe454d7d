"""Which torch device a setting names, and the precision it runs at: one resolver for every stage and command."""

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


def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic on this CPU (AVX512-BF16 or AMX); without it bf16 is emulated and slow."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `train.precision` on `device`; None means plain fp32."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    else:
        supported = cpu_has_bf16()
    if precision == "bf16":
        if device.type == "cuda" and not supported:
            name = torch.cuda.get_device_name(device)
            raise DeviceError(f"train.precision = 'bf16' but {name} has no bf16; set train.precision: auto or fp32")
        return torch.bfloat16
    return torch.bfloat16 if supported else None


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return "cpu"
