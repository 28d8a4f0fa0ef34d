"""The batches :func:`~convify.distill` trains and evaluates on: loaders over the user's data (sharded over
the ranks under ``torchrun``), and a batch split into images and labels on the device."""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Sampler

from convify.errors import ConvifyError, UsageError
from convify.recovery.distillation.distributed import DistContext
from convify.recovery.distillation.speed import Speed


def loader_for(data: Any, ctx: DistContext, batch_size: int, speed: Speed, *, train: bool) -> DataLoader:
    """A DataLoader over ``data``, sharded over the ranks when distributed."""
    if isinstance(data, DataLoader):
        if not ctx.distributed:
            return data
        dataset, batch_size = data.dataset, data.batch_size or batch_size
        options = {"num_workers": data.num_workers, "collate_fn": data.collate_fn, "pin_memory": data.pin_memory,
                   "persistent_workers": data.persistent_workers}
    elif isinstance(data, Dataset):
        dataset, options = data, speed.loader_options(ctx.device)
    else:
        raise ConvifyError(f"distill: data must be a torch DataLoader or Dataset, not {type(data).__name__}; "
                           "wrap tensors in torch.utils.data.TensorDataset")
    if isinstance(dataset, IterableDataset):
        if ctx.distributed:
            raise ConvifyError("distill under torchrun needs a map-style Dataset (with __len__ and __getitem__) "
                               "to shard with DistributedSampler; an IterableDataset cannot be split")
        if isinstance(data, DataLoader):
            return data
        if speed.workers:
            raise UsageError(f"distill: workers={speed.workers} on an IterableDataset would have every worker "
                             "yield the whole dataset; pass a DataLoader of your own over a dataset that splits "
                             "its items by torch.utils.data.get_worker_info()")
        return DataLoader(dataset, batch_size=batch_size, **options)
    if not ctx.distributed:
        return DataLoader(dataset, batch_size=batch_size, shuffle=train, **options)
    sampler = (DistributedSampler(dataset, ctx.world_size, ctx.rank, shuffle=True) if train
               else _Strided(len(dataset), ctx.rank, ctx.world_size))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, **options)


class _Strided(Sampler[int]):
    """Every ``world``-th index from ``rank``: an exact split for evaluation
    (DistributedSampler pads with repeats so that ranks get equal shares)."""

    def __init__(self, size: int, rank: int, world: int) -> None:
        self.indices = range(rank, size, world)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def batch_length(loader: Any) -> int | None:
    """The number of batches per epoch, or None for an iterable without a length."""
    try:
        return len(loader)
    except TypeError:
        return None


def split_batch(batch: Any, device: torch.device, memory_format: torch.memory_format | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``images`` or ``(images, labels, ...)`` -> images, labels (None when absent),
    on ``device`` (the images 4-D ones in ``memory_format`` when given)."""
    if isinstance(batch, torch.Tensor):
        return _images_to(batch, device, memory_format), None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        if labels is not None and (labels.is_floating_point() or labels.dim() != 1):
            labels = None  # not class indices (e.g. a mask or a target image): distill only
        return (_images_to(batch[0], device, memory_format),
                labels.to(device, non_blocking=True) if labels is not None else None)
    raise ConvifyError(f"distill: a batch must be a tensor of images or an (images, labels) pair, "
                       f"not {type(batch).__name__}")


def _images_to(images: torch.Tensor, device: torch.device, memory_format: torch.memory_format | None
               ) -> torch.Tensor:
    # non_blocking: from pinned memory (the CUDA loaders distill builds) the copy overlaps the GPU's work
    if memory_format is None or images.dim() != 4:
        return images.to(device, non_blocking=True)
    return images.to(device, non_blocking=True, memory_format=memory_format)
