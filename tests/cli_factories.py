"""Model factories the CLI tests name by import path (``cli_factories:tiny_net``),
with ``tests/`` on PYTHONPATH, and objects to pickle.

Kept tiny so that each ``python -m convify`` subprocess spends its time on
starting Python and torch, not on the model.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def tiny_net(num_classes: int = 10, width: int = 8, channels: int = 3) -> nn.Module:
    """Conv, max pooling twice, then a flatten -> Linear -> Linear head, for 3x16x16 inputs (or ``channels``)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(width * 4 * 4, 16), nn.ReLU(), nn.Linear(16, num_classes),
    )


def all_conv_net(num_classes: int = 10, channels: int = 3) -> nn.Module:
    """Already all-convolutional (strided convs, 1x1 conv head, global average): nothing to rewrite."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, num_classes, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )


def not_a_model() -> str:
    """A factory that returns something other than a module."""
    return "not a model"


class WritesAFile:
    """Unpickling this object creates the file at ``path`` (via ``open``), the
    stand-in for a malicious pickle: it must never run without --trust-pickle."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.path, "w"))
