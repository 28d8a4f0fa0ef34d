"""One :func:`~convify.distill` run: the epochs, the optimizer steps, the learning-rate schedule, the
evaluation after each epoch, and the checkpoints in between.

The epoch's metrics stay on the device until its end (unless a progress bar
shows them), so that the host queues steps without waiting for each one;
fp16's loss scaler still reads every step's gradients.
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DistributedSampler

from convify.core.metrics import top1, top1_matches
from convify.errors import CompileError, ConvifyError, one_line
from convify.fx import copying
from convify.progress import terminal_bar
from convify.recovery.distillation.checkpoint import CHECKPOINT_NAME, resume_checkpoint, save_checkpoint
from convify.recovery.distillation.data import batch_length, loader_for, split_batch
from convify.recovery.distillation.distributed import DistContext
from convify.recovery.distillation.history import History
from convify.recovery.distillation.loss import distillation_loss, logits_of
from convify.recovery.distillation.speed import Speed, check_precision, compiled

#: ``schedule=`` of :func:`distill`.
SCHEDULES = ("cosine", "constant")


class _Run:
    def __init__(self, teacher: nn.Module, student: nn.Module, data: Any, val_data: Any, ctx: DistContext, *,
                 epochs: int, batch_size: int, lr: float, temperature: float, alpha: float, schedule: str,
                 progress: bool, checkpoint_dir: Path | None, resume: bool, speed: Speed) -> None:
        self.teacher, self.student, self.ctx, self.speed = teacher, student, ctx, speed
        self.epochs, self.temperature, self.alpha = epochs, temperature, alpha
        self.progress = progress and ctx.main and sys.stderr.isatty()
        self.checkpoint_dir, self.resume = checkpoint_dir, resume
        self.train_loader = loader_for(data, ctx, batch_size, speed, train=True)
        self.val_loader = loader_for(val_data, ctx, batch_size, speed, train=False) if val_data is not None else None
        teacher.to(ctx.device)
        student.to(ctx.device)
        check_precision(speed.precision, ctx.device)
        self.optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
        # float16's narrow range needs the loss scaled up (and steps with overflowing gradients skipped);
        # bfloat16 has float32's range and needs no scaler.
        self.scaler = torch.amp.GradScaler(ctx.device.type) if speed.precision == "fp16" else None
        self.compile_pending = speed.compile  # until the compiled student has made its first step
        self.history = History()
        try:
            self.steps_per_epoch: int | None = len(self.train_loader)
        except TypeError:  # an IterableDataset without __len__: step the schedule once per epoch
            self.steps_per_epoch = None
        # Created before a checkpoint's optimizer state is loaded, so that the
        # peak rate (``initial_lr``) is ``lr``, not the decayed rate it was saved at.
        self.scheduler = _scheduler(self.optimizer, schedule, epochs * (self.steps_per_epoch or 1))

    @property
    def check_every_step(self) -> bool:
        """On the CPU a step waits for nothing, so a non-finite loss is caught before it changes the weights;
        on an accelerator that check would make every step wait for the device: it is made once per epoch."""
        return self.ctx.device.type == "cpu"

    def run(self) -> History:
        student_flags = [(m, m.training) for m in self.student.modules()]
        teacher_flags = [(m, m.training) for m in self.teacher.modules()]
        teacher_grads = [(p, p.requires_grad) for p in self.teacher.parameters()]
        try:
            self.teacher.eval().requires_grad_(False)
            self._set_memory_format(self.speed.memory_format)
            start = self._load_checkpoint()  # before DDP wraps the student: every rank loads the same state
            trained = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            ) if self.ctx.distributed else self.student
            if self.speed.compile:  # the DDP-wrapped module, as PyTorch's DDP guidance has it
                trained = compiled(trained)
            for epoch in range(start, self.epochs):
                began = time.perf_counter()
                loss, agreement = self._train_epoch(trained, epoch)
                val_agreement, val_accuracy = self._evaluate()
                self._record(loss, agreement, val_agreement, val_accuracy, time.perf_counter() - began)
                self._save_checkpoint(epoch)
        finally:
            for m, flag in student_flags + teacher_flags:
                m.training = flag
            for p, flag in teacher_grads:
                p.requires_grad_(flag)
            if self.speed.memory_format is not None:
                self._set_memory_format(torch.contiguous_format)
        return self.history

    def _set_memory_format(self, memory_format: torch.memory_format | None) -> None:
        if memory_format is None:
            return
        for model in (self.teacher, self.student):  # the Parameters stay the same objects: the optimizer keeps them
            model.to(memory_format=memory_format)

    def _record(self, loss: float, agreement: float, val_agreement: float | None, val_accuracy: float | None,
                seconds: float) -> None:
        h = self.history
        h.loss.append(loss)
        h.agreement.append(agreement)
        h.val_agreement.append(val_agreement)
        h.val_accuracy.append(val_accuracy)
        h.seconds.append(seconds)
        h.precision.append(self.speed.precision)

    def _train_epoch(self, trained: nn.Module, epoch: int) -> tuple[float, float]:
        sampler = getattr(self.train_loader, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        self.student.train()
        losses: list[torch.Tensor] = []  # on the device, read once at the end of the epoch
        sizes: list[int] = []
        agree: Any = 0
        shown_loss = shown_agree = shown_seen = 0.0
        with terminal_bar(self.progress, total=batch_length(self.train_loader),
                          desc=f"distill {epoch + 1}/{self.epochs}") as bar:
            for batch in self.train_loader:
                x, labels = split_batch(batch, self.ctx.device, self.speed.memory_format)
                loss, agreement = self._step(trained, x, labels, epoch)
                if self.steps_per_epoch is not None:
                    self._step_schedule()
                losses.append(loss)
                sizes.append(x.shape[0])
                agree = agree + agreement
                if bar is not None:  # reading the values waits for the device: only for the bar
                    shown_loss += float(loss) * sizes[-1]
                    shown_agree += float(agreement)
                    shown_seen += sizes[-1]
                    bar.update(1)
                    bar.set_postfix(loss=f"{shown_loss / shown_seen:.4f}",
                                    agreement=f"{shown_agree / shown_seen:.3f}", refresh=False)
        if self.steps_per_epoch is None:
            self._step_schedule()
        loss_sum = float(torch.stack(losses).cpu().double() @ torch.tensor(sizes, dtype=torch.float64)
                         ) if losses else 0.0
        loss_sum, agree, seen = self.ctx.sum([loss_sum, float(agree), float(sum(sizes))])
        if seen == 0:
            raise ConvifyError("distill: the training data yielded no batches")
        if not math.isfinite(loss_sum):  # every rank sees the same sum, so all of them stop here
            raise _non_finite(loss_sum / seen, epoch)
        return loss_sum / seen, agree / seen

    def _step(self, trained: nn.Module, x: torch.Tensor, labels: torch.Tensor | None, epoch: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step: the batch's loss (detached) and how many of its top-1 classes agree."""
        try:
            student_logits, teacher_logits = self._forward(trained, x)
            loss = distillation_loss(student_logits, teacher_logits, labels, self.temperature, self.alpha)
            if self.check_every_step and not torch.isfinite(loss):
                raise _non_finite(loss.item(), epoch)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is None:
                loss.backward()
                self.optimizer.step()
            else:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)  # skipped when the scaled gradients overflowed
                self.scaler.update()
        except ConvifyError:
            raise
        except Exception as e:
            if not self.compile_pending:
                raise
            raise CompileError(f"distill: the torch.compile-d student failed on its first training step "
                               f"({one_line(e)}); to train eagerly, {{no_compile}}") from e
        self.compile_pending = False
        return loss.detach(), top1_matches(student_logits, teacher_logits)

    def _step_schedule(self) -> None:
        if self.scaler is None:
            self.scheduler.step()
            return
        # The schedule counts steps taken, skipped ones too (a resumed run continues the same curve); torch
        # warns when the first step of all was one the scaler skipped, which is how fp16 usually starts.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.scheduler.step()

    def _forward(self, trained: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's and the teacher's logits, float32 under mixed precision."""
        with self.speed.autocast(self.ctx.device):
            with torch.inference_mode():
                teacher_logits = logits_of(self.teacher(x))
            student_logits = logits_of(trained(x))
        if self.speed.dtype is None:
            teacher_logits = teacher_logits.to(student_logits.dtype)
        else:  # the loss (softmax, KL, cross-entropy) in float32
            student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
        if teacher_logits.is_inference():
            # Made under inference_mode: autograd refuses to save it for backward; a copy made here is
            # an ordinary tensor that the loss may use however it likes.
            teacher_logits = teacher_logits.clone()
        return student_logits, teacher_logits

    def _evaluate(self) -> tuple[float | None, float | None]:
        if self.val_loader is None:
            return None, None
        agree: Any = 0
        correct: Any = 0
        seen = labelled = 0
        # no_grad, not inference_mode, for the student: state a module caches in its forward would otherwise
        # be an inference tensor that its next training step cannot use
        with torch.no_grad(), copying.eval_mode(self.student), self.speed.autocast(self.ctx.device):
            for batch in self.val_loader:
                x, labels = split_batch(batch, self.ctx.device, self.speed.memory_format)
                pred = top1(logits_of(self.student(x)))
                with torch.inference_mode():
                    teacher_pred = top1(logits_of(self.teacher(x)))
                agree = agree + top1_matches(pred, teacher_pred)
                seen += x.shape[0]
                if labels is not None:
                    correct = correct + top1_matches(pred, labels)
                    labelled += labels.shape[0]
        agree, correct, seen, labelled = self.ctx.sum([float(agree), float(correct), float(seen), float(labelled)])
        return (agree / seen if seen else None), (correct / labelled if labelled else None)

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint_path(self) -> Path | None:
        return self.checkpoint_dir / CHECKPOINT_NAME if self.checkpoint_dir is not None else None

    def _save_checkpoint(self, epoch: int) -> None:
        path = self._checkpoint_path()
        if path is None or not self.ctx.main:
            return
        save_checkpoint(path, student=self.student, optimizer=self.optimizer, scheduler=self.scheduler,
                        scaler=self.scaler, epoch=epoch, epochs=self.epochs, history=self.history,
                        options=self.speed.as_dict())

    def _load_checkpoint(self) -> int:
        """The epoch to start from (0 unless resuming from a checkpoint)."""
        path = self._checkpoint_path()
        if not self.resume or path is None or not path.exists():
            return 0
        start, self.history = resume_checkpoint(path, self.ctx.device, student=self.student,
                                                optimizer=self.optimizer, scheduler=self.scheduler,
                                                scaler=self.scaler, steps_per_epoch=self.steps_per_epoch)
        return start


def _non_finite(loss: float, epoch: int) -> ConvifyError:
    return ConvifyError(f"distill: the loss became {loss} in epoch {epoch + 1}; lower lr= or check the inputs")


def _scheduler(optimizer: torch.optim.Optimizer, schedule: str, total: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step learning-rate factors: a half cosine from 1 to 0 over ``total`` steps, or 1."""
    if schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1))))
