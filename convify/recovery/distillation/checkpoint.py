"""Distillation checkpoints: what rank 0 saves after every epoch, what a resumed run loads back, and
:func:`load_checkpoint` for reading one afterwards."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from convify.errors import CheckpointError
from convify.recovery.distillation.history import History

CHECKPOINT_NAME = "distill-checkpoint.pt"


def save_checkpoint(path: Path, *, student: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler | None,
                    epoch: int, epochs: int, history: History, options: dict[str, Any]) -> None:
    """Write the run's state after ``epoch`` to ``path``, replacing the previous checkpoint only once the
    new one is complete."""
    state = {"student": student.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "epoch": epoch, "epochs": epochs,
             "history": history.to_dict(), "options": options}
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)  # a crash mid-save leaves the previous checkpoint intact
    except OSError as e:
        raise CheckpointError(f"distill: cannot write the checkpoint {path}: {e}") from e


def resume_checkpoint(path: Path, device: torch.device, *, student: nn.Module, optimizer: torch.optim.Optimizer,
                      scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler | None,
                      steps_per_epoch: int | None) -> tuple[int, History]:
    """Load the checkpoint at ``path`` into the run's objects, in place; returns the epoch to start from
    and the history so far."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        history = History.from_dict(state["history"])
        start = int(state["epoch"]) + 1
        if "scheduler" in state:
            scheduler.load_state_dict(state["scheduler"])
        else:  # a checkpoint from before schedules: put the schedule where that epoch ends
            scheduler.last_epoch = start * (steps_per_epoch or 1) - 1
            scheduler.step()
        # A run may resume in another precision (History.precision records each epoch's); the loss scale
        # carries over only from fp16 to fp16, else fp16 starts from GradScaler's initial scale.
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        return start, history
    except Exception as e:
        raise CheckpointError(f"distill: cannot resume from {path}: {type(e).__name__}: {e}; "
                              "delete it to start over, or pass the student it was saved from") from e


def load_checkpoint(path: str | os.PathLike, student: nn.Module | None = None) -> dict[str, Any]:
    """Read a distillation checkpoint; load its weights into ``student`` when given.

    Returns the dict with ``student`` (state dict), ``optimizer``, ``scheduler``
    (the learning-rate position), ``epoch``, ``history`` (a :class:`History`),
    ``options`` (``precision``, ``channels_last``, ``workers``, ``compile`` of
    the last run; absent in checkpoints older than these options) and, after
    an fp16 epoch, ``scaler`` (the GradScaler's state).

    >>> state = convify.distillation.load_checkpoint("ckpt/distill-checkpoint.pt", allconv)
    >>> state["history"].agreement
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read the distillation checkpoint {path}: {type(e).__name__}: {e}") from e
    state["history"] = History.from_dict(state.get("history", {}))
    if student is not None:
        try:
            student.load_state_dict(state["student"])
        except RuntimeError as e:
            raise CheckpointError(f"the checkpoint {path} does not fit this student: {e}") from e
    return state
