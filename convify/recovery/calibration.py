"""Calibration data as the rewrites and recovery read it: a re-iterable sequence of batches."""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from convify.errors import UsageError


def calibration_batches(calibration: Iterable[Any], who: str) -> Sequence[Any]:
    """Calibration data as a re-iterable sequence of batches (a one-shot
    iterator is read into a list; a tensor is one batch)."""
    if isinstance(calibration, torch.Tensor):
        return [calibration]
    if iter(calibration) is calibration:  # type: ignore[arg-type]
        calibration = list(calibration)
    if next(iter(calibration), None) is None:
        raise UsageError(f"{who}: calibration= yielded no batches; pass at least one input batch")
    return calibration  # type: ignore[return-value]


def first_input(batch: Any) -> torch.Tensor | None:
    """One sample of a calibration batch (a tensor or an (input, label) pair)."""
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    return batch[:1] if isinstance(batch, torch.Tensor) else None
