"""The loss window: per-step losses kept on the device and read in one host sync."""

from __future__ import annotations

import torch

from src.training.loss import LOSS_KEYS


class LossWindow:
    """Per-step losses kept on the device; `read` is the one host sync, averaged over processes."""

    def __init__(self, size: int, device: torch.device, world_size: int):
        self.buf = torch.zeros(size, len(LOSS_KEYS), device=device)
        self.n = 0
        self.world_size = world_size

    def add(self, row: torch.Tensor) -> None:
        self.buf[self.n].copy_(row)
        self.n += 1

    def read(self, *flags: bool) -> tuple[list[list[float]], list[bool]]:
        """(rows of this window, each flag OR-ed over all processes) in one transfer."""
        k = len(flags)
        flag_values = torch.tensor([float(f) for f in flags], device=self.buf.device)
        flat = torch.cat([self.buf[: self.n].flatten(), flag_values])
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(flat)
            flat[: flat.numel() - k] /= self.world_size
        values = flat.tolist()
        rows = [values[i * len(LOSS_KEYS) : (i + 1) * len(LOSS_KEYS)] for i in range(self.n)]
        self.n = 0
        return rows, [v > 0 for v in values[len(values) - k :]]
