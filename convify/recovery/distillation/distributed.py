"""Where a :func:`~convify.distill` process trains, and whether it is one of several ranks.

Under ``torchrun --nproc-per-node N`` (``WORLD_SIZE > 1``) it joins (or starts)
the process group (gloo on CPU, nccl on CUDA); the run wraps the student in
``DistributedDataParallel``, shards the data, averages the metrics over the
ranks with :meth:`DistContext.sum`, and only rank 0 writes checkpoints.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from convify.ranks import join_process_group


@dataclass
class DistContext:
    """Where this process trains, and whether it is one of several ranks."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, device: str | torch.device | None) -> "DistContext":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = f"cuda:{local_rank}" if torch.cuda.is_available() and world > 1 else (
                "cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None and world > 1:
            dev = torch.device("cuda", local_rank)
        if world <= 1:
            return cls(dev)
        owns = join_process_group(dev)
        return cls(dev, dist.get_rank(), dist.get_world_size(), owns)

    def stop(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def sum(self, values: list[float]) -> list[float]:
        """Sum ``values`` over the ranks (identity in one process)."""
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64,
                         device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        return t.tolist()
