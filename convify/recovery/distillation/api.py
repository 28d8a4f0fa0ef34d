"""``convify.distill``: its arguments, checked, and the run they start."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from convify.errors import ConvifyError, UsageError
from convify.recovery.distillation.distributed import DistContext
from convify.recovery.distillation.history import History
from convify.recovery.distillation.run import SCHEDULES, _Run
from convify.recovery.distillation.speed import Speed


def distill(teacher: nn.Module, student: nn.Module, data: Any, *, epochs: int = 1, batch_size: int = 64,
            lr: float = 1e-3, temperature: float = 4.0, alpha: float = 0.9, val_data: Any = None,
            device: str | torch.device | None = None, progress: bool = True,
            checkpoint_dir: str | os.PathLike | None = None, resume: bool = False,
            schedule: str = "cosine", precision: str = "fp32", channels_last: bool = False, workers: int = 0,
            compile: bool = False) -> History:
    """Train ``student`` in place to imitate ``teacher``; returns the :class:`History`.

    Args:
        teacher: the original model; frozen and run in eval mode.
        student: the rewritten model; trained in place with Adam and left in
            the train/eval mode it came in, on ``device``.
        data: a ``DataLoader`` or a map-style ``Dataset`` whose batches are
            images, or ``(image, label)`` pairs. Without labels the loss is
            pure distillation; with labels it is
            ``alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) * CE(student, label)``.
        epochs: the total number of epochs (a resumed run continues up to it).
        batch_size: used when ``data`` is a Dataset.
        lr: Adam's learning rate (the peak of the schedule).
        temperature, alpha: the softening temperature T and the weight of the
            distillation term.
        val_data: the same kinds as ``data``; measured after every epoch.
        device: default: ``cuda`` (``cuda:LOCAL_RANK`` under torchrun) when
            available, else ``cpu``. Both models are moved there.
        progress: a progress bar with loss and agreement (only when stderr is
            a terminal, only on rank 0).
        checkpoint_dir: where rank 0 saves, after every epoch, the student,
            the optimizer, the epoch and the history (``distill-checkpoint.pt``).
        resume: continue from the checkpoint in ``checkpoint_dir`` when there is
            one (a first run with ``resume=True`` starts from scratch).
        schedule: ``"cosine"`` (default): the learning rate decays from ``lr``
            to 0 along a half cosine over the whole run (``epochs``), stepped
            every batch (every epoch when the data has no length); the
            position is saved in checkpoints, so a resumed run continues the
            same curve. ``"constant"``: ``lr`` throughout. Because the decay
            spans the run, a 2-epoch run ends better than the second epoch of
            a 3-epoch run: pass the ``epochs`` you mean to stop at.
        precision: ``"fp32"`` (default): no autocast. ``"bf16"`` / ``"fp16"``:
            the student's and the teacher's forward passes run under
            ``torch.autocast`` in that dtype (the weights, the optimizer and
            the loss stay float32); ``"fp16"`` scales the loss with a
            ``torch.amp.GradScaler`` (saved in checkpoints). A precision the
            device cannot autocast to is refused (:class:`UsageError`), not run
            in float32. A resumed run may change it; ``History.precision``
            records each epoch's.
        channels_last: both models and the 4-D images in
            ``torch.channels_last`` memory format while training (faster
            convolutions on recent GPUs, same results); the models are given
            back in the default (contiguous) format.
        workers: ``num_workers`` (with ``persistent_workers``) of the
            DataLoaders distill builds for a ``data`` / ``val_data`` Dataset.
            A DataLoader you pass keeps its own settings. On CUDA those
            loaders pin memory and batches are copied without blocking.
        compile: train a ``torch.compile``-d student (the DDP-wrapped one
            under torchrun); ``student`` itself stays the plain module that
            is checkpointed and evaluated. Compiling happens on the first
            step; if it fails, :class:`~convify.errors.CompileError` says so.

    The teacher always runs under ``torch.inference_mode()``.

    >>> allconv = convify.replace_maxpool(model, init="fit", calibration=batches)
    >>> history = convify.distill(model, allconv, train_set, epochs=2, val_data=test_set)
    >>> history.agreement[-1], history.val_accuracy[-1]
    """
    _check_arguments(teacher, student, epochs, temperature, alpha, resume, checkpoint_dir)
    if schedule not in SCHEDULES:
        raise UsageError(f"distill: schedule must be one of {SCHEDULES}, not {schedule!r}")
    speed = Speed(precision, channels_last, workers, compile)
    speed.check(data, val_data)
    ctx = DistContext.start(device)
    try:
        return _Run(teacher, student, data, val_data, ctx, epochs=epochs, batch_size=batch_size, lr=lr,
                    temperature=temperature, alpha=alpha, schedule=schedule, progress=progress,
                    checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir is not None else None,
                    resume=resume, speed=speed).run()
    finally:
        ctx.stop()


def _check_arguments(teacher: Any, student: Any, epochs: int, temperature: float, alpha: float, resume: bool,
                     checkpoint_dir: Any) -> None:
    for name, m in (("teacher", teacher), ("student", student)):
        if not isinstance(m, nn.Module):
            raise ConvifyError(f"distill: {name} must be a torch.nn.Module, not {type(m).__name__}")
    if teacher is student:
        raise ConvifyError("distill: teacher and student are the same module; pass the rewritten copy as student")
    if not any(p.requires_grad for p in student.parameters()):
        raise ConvifyError("distill: the student has no trainable parameters (all requires_grad=False)")
    if epochs < 1:
        raise UsageError(f"distill: epochs must be at least 1, not {epochs}")
    if temperature <= 0:
        raise UsageError(f"distill: temperature must be positive, not {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise UsageError(f"distill: alpha weighs distillation against labels and must be in [0, 1], not {alpha}")
    if resume and checkpoint_dir is None:
        raise UsageError("distill: resume=True needs checkpoint_dir= (the folder the checkpoints are in)")

