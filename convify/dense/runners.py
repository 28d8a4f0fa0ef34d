"""What runs the tiles: the PyTorch model, an onnxruntime session, and the ranks under ``torchrun``.

A runner takes a batch of tiles (already converted to the model's input) and
returns the model's output on the CPU.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from convify.dense.geometry import graph_geometry
from convify.dense.tiles import Tile, minimum_tile
from convify.errors import UsageError
from convify.export.onnx import export_onnx
from convify.export.sessions import execution_provider, open_session
from convify.fx import tracing


class TorchRunner:
    """Tiles through the PyTorch model on ``device``."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        self.model, self.device, self.dtype = model, device, dtype

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.model(batch.to(self.device))
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out.cpu()


class OrtRunner:
    """Tiles through an onnxruntime session, its provider checked as ``verify`` checks it."""

    def __init__(self, path: Path, provider: str) -> None:
        self.session = open_session(path, execution_provider(provider))
        self.name = self.session.get_inputs()[0].name
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        (out, *_) = self.session.run(None, {self.name: batch.numpy()})
        return torch.from_numpy(out)


class runner:  # noqa: N801  (a context manager used as a function)
    """The torch model, or an onnxruntime session on a given or temporary ONNX file."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype, onnx: Any, provider: str,
                 shape: tuple[int, ...]) -> None:
        self.args = (model, device, dtype, onnx, provider, shape)
        self.tmp: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> Callable[[torch.Tensor], torch.Tensor]:
        model, device, dtype, onnx, provider, shape = self.args
        if onnx is None or onnx is False:
            return TorchRunner(model, device, dtype)
        if onnx is True:
            execution_provider(provider)  # an unavailable provider fails before the export, not after

            self.tmp = tempfile.TemporaryDirectory(prefix="convify-dense-")
            side = max(minimum_tile(a) for a in graph_geometry(tracing.trace(model)).axes)
            example = torch.zeros(1, shape[1], side, side, dtype=dtype)
            onnx = export_onnx(model.cpu() if device.type == "cpu" else model, Path(self.tmp.name) / "dense.onnx",
                               example, dynamic_spatial=True)
        path = Path(onnx)
        if not path.is_file():
            raise UsageError(f"onnx={str(path)!r}: no such ONNX file")
        return OrtRunner(path, provider)

    def __exit__(self, *exc: Any) -> None:
        if self.tmp is not None:
            self.tmp.cleanup()


# --------------------------------------------------------------------------- torchrun


@dataclass
class Ranks:
    """This process's rank among ``world`` under ``torchrun`` (rank 0 of 1 otherwise)."""

    rank: int = 0
    world: int = 1
    owns_group: bool = False

    @classmethod
    def start(cls, device: torch.device) -> "Ranks":
        """Under ``torchrun`` (``WORLD_SIZE > 1``): join or start the process group (gloo on CPU)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist  # noqa: PLC0415

        from convify.ranks import join_process_group  # noqa: PLC0415

        owns = join_process_group(device)
        return cls(dist.get_rank(), dist.get_world_size(), owns)

    def gather(self, pieces: list[tuple[Tile, torch.Tensor]]) -> list[tuple[Tile, torch.Tensor]] | None:
        """Every rank's pieces on rank 0 (None elsewhere)."""
        if self.world <= 1:
            return pieces
        import torch.distributed as dist  # noqa: PLC0415

        received: list[Any] | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object(pieces, received, dst=0)
        if self.owns_group:
            dist.destroy_process_group()
        return [p for part in received for p in part] if received is not None else None
