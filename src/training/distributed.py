"""Processes under torchrun: joining the group, this process's rank and device, and per-process seeds.

Under `torchrun --nproc_per_node=N -m src.train` each process trains on its own batches (its own
seeds; `batch_size` is per process) with DistributedDataParallel; rank 0 writes checkpoints,
outputs and the MLflow run. Across machines (`--nnodes`) only rank 0's machine holds the
checkpoint: it is read there and sent to every process; every node must hold the same snapshot.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import numpy as np
import torch

from src.device import resolve_device
from src.errors import UserError


def init_distributed(device_name: str) -> tuple[int, int]:
    """Join the torchrun process group when there is one: (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def end_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of an initialised process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def from_rank0(value: Any) -> Any:
    """Rank 0's `value` on every process (e.g. a checkpoint that only rank 0's machine holds)."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_same_on_every_rank(value: str, what: str, fix: str) -> None:
    """Raise UserError on every process (so all of them stop) unless every rank holds the same `value`."""
    import torch.distributed as dist

    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    odd = [rank for rank, v in enumerate(values) if v != values[0]]
    if odd:
        raise UserError(f"{what} differs between the processes: rank 0 has {values[0]}, rank {odd[0]} has "
                        f"{values[odd[0]]}; {fix}")


def process_device(device_name: str, world_size: int) -> torch.device:
    """The device `train.device` names for this process: cuda:LOCAL_RANK under torchrun."""
    return resolve_device(device_name, int(os.environ.get("LOCAL_RANK", "0")) if world_size > 1 else None)


def stream_seed(seed: int, rank: int, stream: int) -> int:
    """Independent seeds for each (process, random stream) from the one `seed` of params.yaml."""
    return int(np.random.SeedSequence([seed, rank, stream]).generate_state(1)[0])


def ddp_kwargs() -> dict[str, Any]:
    """Each process keeps its own BN statistics: broadcasting rank 0's buffers before every forward
    would change, in place, tensors that the pending backward of D's two forward passes needs."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}
