"""How close a rewritten model's outputs are to the original's: top-1 agreement, in one place.

``init="fit"``, ``verify`` and ``distill`` all report it; they call these.
"""
from __future__ import annotations

import torch


def top1(scores: torch.Tensor) -> torch.Tensor:
    """The class of each row: the highest score's index, or ``scores``
    itself when it already holds class indices (one dimension)."""
    return scores if scores.dim() == 1 else scores.argmax(1)


def top1_matches(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many rows of ``a`` and ``b`` (scores or class indices) agree on
    the top-1 class, as a tensor on their device (no host sync)."""
    return (top1(a) == top1(b)).sum()


def top1_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """The fraction of rows of ``a`` and ``b`` (scores or class indices) that
    agree on the top-1 class.

    >>> top1_agreement(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
    0.5
    """
    return float((top1(a) == top1(b)).double().mean())
