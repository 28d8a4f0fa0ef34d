"""The options of :func:`~convify.distill` that make it train faster: precision, memory format, loader
workers and ``torch.compile``.

On a GPU, ``precision="bf16"`` (or ``"fp16"``, with a gradient scaler) runs
both forward passes under autocast, ``channels_last=True`` stores weights and
images channels-last, ``workers=N`` loads batches in N processes (pinned, copied
without blocking), and ``compile=True`` trains a ``torch.compile``-d student.
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from convify.errors import CompileError, UsageError, one_line

#: ``precision=`` of :func:`distill`: the dtype the forward passes autocast to (None: no autocast).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Speed:
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


def check_precision(precision: str, device: torch.device) -> None:
    reason = _autocasts(precision, device)
    if reason is None:
        return
    working = [p for p in PRECISIONS if p != precision and _autocasts(p, device) is None]
    raise UsageError(f"distill: precision {precision!r} cannot run on {device} ({reason}); choose another "
                     f"{{precision}} ({' or '.join(working)}) or another {{device}}")


def compiled(module: nn.Module) -> nn.Module:
    try:
        return torch.compile(module)
    except Exception as e:
        raise CompileError(f"distill: torch.compile is not available here ({one_line(e)}); to train eagerly, "
                           "{no_compile}") from e
