"""Running under ``torchrun``: joining the process group, once, for every
part of convify that shares work among ranks (``distill``, ``dense_map``)."""
from __future__ import annotations

import torch


def join_process_group(device: torch.device) -> bool:
    """Start the default process group for ``device`` (nccl on CUDA, gloo
    elsewhere) unless one exists; returns whether this call started it (and
    so should destroy it when done)."""
    import torch.distributed as dist  # noqa: PLC0415

    if dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True
