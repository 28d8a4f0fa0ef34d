"""Fashion-MNIST for the examples: the IDX files, or a synthetic stand-in for ``--quick``.

The Debian package ``dataset-fashion-mnist`` puts the gzipped IDX files under
``/usr/share/datasets/fashion-mnist/``; set ``FASHION_MNIST_DIR`` to read them
from elsewhere (``convify.zoo.fashion_mnist`` reads them). ``--quick`` uses
small synthetic 28x28 images instead: ten classes of bright shapes on a black
background, learnable in a few seconds, so the examples run anywhere.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from convify import zoo
from convify.errors import DataError

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


class Split(NamedTuple):
    """Images ``(N, 1, 28, 28)`` in [0, 1] and labels ``(N,)`` int64."""

    images: torch.Tensor
    labels: torch.Tensor


class Data(NamedTuple):
    train: Split
    test: Split
    source: str  # "Fashion-MNIST" or "synthetic stand-in"


def _shape(label: int, g: torch.Generator) -> torch.Tensor:
    """A 28x28 image of class ``label``: a jittered shape that a small CNN tells apart."""
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    cy, cx = 14 + torch.randint(-3, 4, (2,), generator=g).float()
    r = 6 + 3 * torch.rand((), generator=g)
    dy, dx = yy - cy, xx - cx
    masks = (
        (dy.abs() < r) & (dx.abs() < r),                        # square
        dy ** 2 + dx ** 2 < r ** 2,                             # disc
        (dy.abs() < r) & (dx.abs() < 2),                        # vertical bar
        (dy.abs() < 2) & (dx.abs() < r),                        # horizontal bar
        (dy.abs() < r) & ((dy - dx).abs() < 2),                 # diagonal
        (dy.abs() < r) & ((dy + dx).abs() < 2),                 # anti-diagonal
        ((dy ** 2 + dx ** 2).sqrt() - r).abs() < 1.5,           # ring
        ((dy.abs() < 2) | (dx.abs() < 2)) & (dy.abs() < r) & (dx.abs() < r),  # plus
        (dy.abs() < r) & (dx.abs() < r) & (dy > dx.abs() - r),  # triangle
        (dy.abs() < r) & (dx.abs() < r) & ((dy.floor() % 4) < 2),  # stripes
    )
    image = masks[label].float() * (0.6 + 0.4 * torch.rand((), generator=g))
    return (image + 0.05 * torch.rand(28, 28, generator=g)).clamp(0, 1)


def synthetic(n_train: int = 1000, n_test: int = 300, seed: int = 0) -> Data:
    """The stand-in: ten shape classes, balanced, same tensor layout as Fashion-MNIST."""
    g = torch.Generator().manual_seed(seed)
    splits = []
    for n in (n_train, n_test):
        labels = torch.arange(n) % 10
        labels = labels[torch.randperm(n, generator=g)]
        images = torch.stack([_shape(int(y), g) for y in labels]).unsqueeze(1)
        splits.append(Split(images, labels))
    return Data(splits[0], splits[1], "synthetic stand-in")


def load(quick: bool) -> Data:
    """Fashion-MNIST for a full run; the synthetic stand-in for ``--quick``.

    A full run without the dataset stops with the command that installs it.
    """
    if quick:
        return synthetic()
    try:
        return Data(Split(*zoo.fashion_mnist("train")), Split(*zoo.fashion_mnist("test")), "Fashion-MNIST")
    except DataError as e:
        raise SystemExit(f"{e}, or run with --quick") from e


def accuracy(model: torch.nn.Module, split: Split, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` (in eval mode, restored afterwards) on ``split``."""
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(split.labels), batch_size):
            logits = model(split.images[i:i + batch_size])
            correct += int((logits.flatten(1).argmax(1) == split.labels[i:i + batch_size]).sum())
    model.train(was_training)
    return correct / len(split.labels)


def train_epoch(model: torch.nn.Module, split: Split, optimizer: torch.optim.Optimizer, batch_size: int = 128,
                seed: int = 0, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> float:
    """One epoch of cross-entropy training in shuffled mini-batches; returns the mean loss.

    ``scheduler``, when given, is stepped after every batch (a per-step decay).
    """
    model.train()
    order = torch.randperm(len(split.labels), generator=torch.Generator().manual_seed(seed))
    total = 0.0
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        loss = torch.nn.functional.cross_entropy(model(split.images[idx]).flatten(1), split.labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += loss.item() * len(idx)
    return total / len(order)
