"""Knowledge distillation of a rewritten model toward the original.

The rewrite replaces max pooling (non-linear) by strided convolution (linear),
so a trained model loses some accuracy; ``distill`` trains the rewritten
*student* to reproduce the original *teacher*'s softened outputs (Hinton et
al., 2015), plus the labels when the data has them.

Runs unchanged under ``torchrun --nproc-per-node N``: when ``WORLD_SIZE > 1``
it joins (or starts) the process group (gloo on CPU, nccl on CUDA), wraps the
student in ``DistributedDataParallel``, shards a map-style dataset with
``DistributedSampler``, averages the metrics over the ranks, and only rank 0
writes checkpoints.

On a GPU, ``precision="bf16"`` (or ``"fp16"``, with a gradient scaler) runs
both forward passes under autocast, ``channels_last=True`` stores weights and
images channels-last, ``workers=N`` loads batches in N processes (pinned, copied
without blocking), and ``compile=True`` trains a ``torch.compile``-d student.
The epoch's metrics stay on the device until its end (unless a progress bar
shows them), so that the host queues steps without waiting for each one;
fp16's loss scaler still reads every step's gradients.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Sampler

from convify.errors import CheckpointError, CompileError, ConvifyError, DataError, UsageError, one_line
from convify.fx import copying
from convify.fx.inputs import output_tensor
from convify.progress import terminal_bar
from convify.ranks import join_process_group

CHECKPOINT_NAME = "distill-checkpoint.pt"
#: ``schedule=`` of :func:`distill`.
SCHEDULES = ("cosine", "constant")
#: ``precision=`` of :func:`distill`: the dtype the forward passes autocast to (None: no autocast).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class History:
    """Per-epoch metrics of a :func:`distill` run (one entry per epoch, oldest first).

    ``loss`` is the mean training loss; ``agreement`` the fraction of training
    inputs on which the student's top-1 class equals the teacher's;
    ``val_agreement`` / ``val_accuracy`` the same on ``val_data`` (accuracy only
    when it has labels, else None); ``seconds`` the wall time of each epoch;
    ``precision`` the ``precision=`` each epoch ran in (a resumed run may change it).
    """

    loss: list[float] = field(default_factory=list)
    agreement: list[float] = field(default_factory=list)
    val_agreement: list[float | None] = field(default_factory=list)
    val_accuracy: list[float | None] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    precision: list[str] = field(default_factory=list)

    @property
    def epochs(self) -> int:
        return len(self.loss)

    def to_dict(self) -> dict[str, list]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, list]) -> "History":
        history = cls(**{f.name: list(data.get(f.name, [])) for f in dataclasses.fields(cls)})
        if "precision" not in data:  # saved before precision= existed, when every epoch ran in float32
            history.precision = ["fp32"] * history.epochs
        return history

    def __str__(self) -> str:
        lines = ["epoch  loss      agreement  val_agreement  val_accuracy  seconds"]
        for i in range(self.epochs):
            va, acc = self.val_agreement[i], self.val_accuracy[i]
            lines.append(f"{i + 1:<5}  {self.loss[i]:<8.4f}  {self.agreement[i]:<9.4f}  "
                         f"{'-' if va is None else f'{va:.4f}':<13}  {'-' if acc is None else f'{acc:.4f}':<12}  "
                         f"{self.seconds[i]:.1f}")
        return "\n".join(lines)


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
    speed = _Speed(precision, channels_last, workers, compile)
    speed.check(data, val_data)
    ctx = _DistContext.start(device)
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


# --------------------------------------------------------------------------- speed options


@dataclass(frozen=True)
class _Speed:
    """The options of :func:`distill` that make it train faster: they change how it computes (bf16 and fp16
    round more coarsely), not what it learns."""

    precision: str = "fp32"
    channels_last: bool = False
    workers: int = 0
    compile: bool = False

    @property
    def dtype(self) -> torch.dtype | None:
        return PRECISIONS[self.precision]

    @property
    def memory_format(self) -> torch.memory_format | None:
        return torch.channels_last if self.channels_last else None

    def check(self, data: Any, val_data: Any) -> None:
        if self.precision not in PRECISIONS:
            raise UsageError(f"distill: precision must be one of {tuple(PRECISIONS)}, not {self.precision!r}")
        if not isinstance(self.workers, int) or isinstance(self.workers, bool) or self.workers < 0:
            raise UsageError(f"distill: workers must be a whole number of processes (0: load in this one), "
                             f"not {self.workers!r}")
        if self.workers and all(d is None or isinstance(d, DataLoader) for d in (data, val_data)):
            raise UsageError(f"distill: workers={self.workers} sets the loaders distill builds for a Dataset, and "
                             "it builds none: a DataLoader you pass keeps its settings; give it num_workers= "
                             "instead")

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)

    def loader_options(self, device: torch.device) -> dict[str, Any]:
        """DataLoader keywords for a Dataset distill wraps itself."""
        return {"num_workers": self.workers, "persistent_workers": self.workers > 0,
                "pin_memory": device.type == "cuda"}

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _autocasts(precision: str, device: torch.device) -> str | None:
    """Why ``precision`` cannot run on ``device`` (None: it can). Tried, not
    looked up: torch only warns, and runs in float32, where it cannot autocast."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autocast(device.type, dtype=dtype):
                probe = torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)
            if precision == "fp16" and not torch.amp.GradScaler(device.type).is_enabled():
                return f"torch {torch.__version__} has no gradient scaler for {device.type}"
    except Exception as e:  # noqa: BLE001  (any refusal is the answer)
        return one_line(e)
    if probe.dtype != dtype:
        return f"torch {torch.__version__} does not autocast to {dtype} on {device.type}"
    return None


def _check_precision(precision: str, device: torch.device) -> None:
    reason = _autocasts(precision, device)
    if reason is None:
        return
    working = [p for p in PRECISIONS if p != precision and _autocasts(p, device) is None]
    raise UsageError(f"distill: precision {precision!r} cannot run on {device} ({reason}); choose another "
                     f"{{precision}} ({' or '.join(working)}) or another {{device}}")


def _compiled(module: nn.Module) -> nn.Module:
    try:
        return torch.compile(module)
    except Exception as e:
        raise CompileError(f"distill: torch.compile is not available here ({one_line(e)}); to train eagerly, "
                           "{no_compile}") from e


# --------------------------------------------------------------------------- distributed


@dataclass
class _DistContext:
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
    def start(cls, device: str | torch.device | None) -> "_DistContext":
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


class _Strided(Sampler[int]):
    """Every ``world``-th index from ``rank``: an exact split for evaluation
    (DistributedSampler pads with repeats so that ranks get equal shares)."""

    def __init__(self, size: int, rank: int, world: int) -> None:
        self.indices = range(rank, size, world)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# --------------------------------------------------------------------------- data


def _loader(data: Any, ctx: _DistContext, batch_size: int, speed: _Speed, *, train: bool) -> DataLoader:
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


def _split(batch: Any, device: torch.device, memory_format: torch.memory_format | None = None
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


def _logits(output: Any) -> torch.Tensor:
    """Classifier logits from a model output: a tensor (a ``N x classes x 1 x 1`` score map is flattened), a
    Hugging Face ``ModelOutput``'s ``logits``, or the first element of a tuple (timm, torchvision aux heads)."""
    logits = output_tensor(output)
    if logits is None:
        raise ConvifyError(f"distill: the model returned {type(output).__name__}, which holds no tensor of class "
                           "logits; distill a model that returns logits (or a tuple or ModelOutput holding them)")
    return logits.flatten(1) if logits.dim() > 2 else logits


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
                      temperature: float, alpha: float) -> torch.Tensor:
    """``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, labels)``
    (the KL term alone when there are no labels).

    >>> distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), None, 4.0, 0.9)
    tensor(0.)
    """
    t = temperature
    kd = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                  reduction="batchmean", log_target=True) * (t * t)
    if labels is None:
        return kd
    return alpha * kd + (1.0 - alpha) * F.cross_entropy(student_logits, labels)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class ImageFiles(Dataset):
    """A flat folder of images, unlabelled: item ``i`` is one image tensor.

    >>> data = ImageFiles("calibration/", transform=image_transform((1, 3, 224, 224)))
    """

    def __init__(self, root: str | os.PathLike, transform: Any = None) -> None:
        self.root = Path(root)
        self.files = sorted(p for p in self.root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Any:
        from PIL import Image  # noqa: PLC0415  (torchvision's dependency)

        with Image.open(self.files[index]) as image:
            image = image.convert("RGB")
            return self.transform(image) if self.transform is not None else image


def image_transform(input_shape: tuple[int, ...], mean: tuple[float, ...] | None = None,
                    std: tuple[float, ...] | None = None) -> Any:
    """Resize to the model's ``(N, C, H, W)`` input, to tensor, normalize
    (ImageNet statistics for 3 channels, 0.5/0.5 otherwise, unless given)."""
    from torchvision import transforms as T  # noqa: PLC0415

    channels, size = input_shape[1], tuple(input_shape[2:])
    if mean is None:
        mean = (0.485, 0.456, 0.406) if channels == 3 else (0.5,) * channels
    if std is None:
        std = (0.229, 0.224, 0.225) if channels == 3 else (0.5,) * channels
    steps = [T.Resize(size), T.CenterCrop(size)]
    if channels == 1:
        steps.append(T.Grayscale(1))
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


def image_folder(root: str | os.PathLike, input_shape: tuple[int, ...], **normalize: Any) -> Dataset:
    """``root`` as a Dataset: a torchvision ``ImageFolder`` (``(image, label)``,
    labels from the subfolders) when it has subfolders, else :class:`ImageFiles`
    (images only). Images are resized to ``input_shape``'s height and width.

    >>> data = image_folder("train/", (1, 3, 224, 224))
    """
    path = Path(root)
    if not path.is_dir():
        raise DataError(f"{path} is not a directory of images")
    transform = image_transform(input_shape, **normalize)
    if any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir()):
        from torchvision.datasets import ImageFolder  # noqa: PLC0415

        try:
            return ImageFolder(str(path), transform=transform)
        except (FileNotFoundError, RuntimeError) as e:
            raise DataError(f"{path}: {e}") from e
    files = ImageFiles(path, transform)
    if not len(files):
        raise DataError(f"{path} holds no images ({', '.join(IMAGE_EXTENSIONS)}) and no class subfolders")
    return files


# --------------------------------------------------------------------------- the run


class _Run:
    def __init__(self, teacher: nn.Module, student: nn.Module, data: Any, val_data: Any, ctx: _DistContext, *,
                 epochs: int, batch_size: int, lr: float, temperature: float, alpha: float, schedule: str,
                 progress: bool, checkpoint_dir: Path | None, resume: bool, speed: _Speed) -> None:
        self.teacher, self.student, self.ctx, self.speed = teacher, student, ctx, speed
        self.epochs, self.temperature, self.alpha = epochs, temperature, alpha
        self.progress = progress and ctx.main and sys.stderr.isatty()
        self.checkpoint_dir, self.resume = checkpoint_dir, resume
        self.train_loader = _loader(data, ctx, batch_size, speed, train=True)
        self.val_loader = _loader(val_data, ctx, batch_size, speed, train=False) if val_data is not None else None
        teacher.to(ctx.device)
        student.to(ctx.device)
        _check_precision(speed.precision, ctx.device)
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
                trained = _compiled(trained)
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
        with terminal_bar(self.progress, total=_length(self.train_loader),
                          desc=f"distill {epoch + 1}/{self.epochs}") as bar:
            for batch in self.train_loader:
                x, labels = _split(batch, self.ctx.device, self.speed.memory_format)
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
        return loss.detach(), (student_logits.argmax(1) == teacher_logits.argmax(1)).sum()

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
                teacher_logits = _logits(self.teacher(x))
            student_logits = _logits(trained(x))
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
                x, labels = _split(batch, self.ctx.device, self.speed.memory_format)
                pred = _logits(self.student(x)).argmax(1)
                with torch.inference_mode():
                    teacher_pred = _logits(self.teacher(x)).argmax(1)
                agree = agree + (pred == teacher_pred).sum()
                seen += x.shape[0]
                if labels is not None:
                    correct = correct + (pred == labels).sum()
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
        state = {"student": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "epoch": epoch, "epochs": self.epochs,
                 "history": self.history.to_dict(), "options": self.speed.as_dict()}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(state, tmp)
            os.replace(tmp, path)  # a crash mid-save leaves the previous checkpoint intact
        except OSError as e:
            raise CheckpointError(f"distill: cannot write the checkpoint {path}: {e}") from e

    def _load_checkpoint(self) -> int:
        """The epoch to start from (0 unless resuming from a checkpoint)."""
        path = self._checkpoint_path()
        if not self.resume or path is None or not path.exists():
            return 0
        try:
            state = torch.load(path, map_location=self.ctx.device, weights_only=True)
            self.student.load_state_dict(state["student"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.history = History.from_dict(state["history"])
            start = int(state["epoch"]) + 1
            if "scheduler" in state:
                self.scheduler.load_state_dict(state["scheduler"])
            else:  # a checkpoint from before schedules: put the schedule where that epoch ends
                self.scheduler.last_epoch = start * (self.steps_per_epoch or 1) - 1
                self.scheduler.step()
            # A run may resume in another precision (History.precision records each epoch's); the loss scale
            # carries over only from fp16 to fp16, else fp16 starts from GradScaler's initial scale.
            if self.scaler is not None and "scaler" in state:
                self.scaler.load_state_dict(state["scaler"])
            return start
        except Exception as e:
            raise CheckpointError(f"distill: cannot resume from {path}: {type(e).__name__}: {e}; "
                                  "delete it to start over, or pass the student it was saved from") from e


def _non_finite(loss: float, epoch: int) -> ConvifyError:
    return ConvifyError(f"distill: the loss became {loss} in epoch {epoch + 1}; lower lr= or check the inputs")


def _scheduler(optimizer: torch.optim.Optimizer, schedule: str, total: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step learning-rate factors: a half cosine from 1 to 0 over ``total`` steps, or 1."""
    if schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1))))


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


def _length(loader: Any) -> int | None:
    """The number of batches per epoch, or None for an iterable without a length."""
    try:
        return len(loader)
    except TypeError:
        return None


__all__ = ["History", "distill", "distillation_loss", "load_checkpoint", "CHECKPOINT_NAME", "SCHEDULES", "PRECISIONS",
           "ImageFiles",
           "image_folder", "image_transform"]
