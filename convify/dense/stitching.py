"""Running the tiles of a plan and stitching the outputs each owns into the one-pass map.

Shared by the PyTorch and the ONNX scans (:mod:`convify.dense.scanning`,
:mod:`convify.dense.onnx_scan`): a runner takes a batch of converted tiles
and returns the model's output on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from convify.dense.images import convert_pixels
from convify.dense.runners import Ranks
from convify.dense.tiles import Tile, TilePlan
from convify.errors import ConvifyError
from convify.progress import terminal_bar


@dataclass(frozen=True)
class Scan:
    """What :func:`scan` did: the map (None on ranks other than 0), the image it read, and the plan."""

    scores: torch.Tensor | None
    image: torch.Tensor
    plan: TilePlan
    batch_size: int
    runner: str


def run_and_stitch(plan: TilePlan, image: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor], batch_size: int,
                   normalize: Any, ranks: Ranks, progress: bool) -> torch.Tensor | None:
    """The one-pass map from ``plan``'s tiles of ``image`` (None on ranks other than 0)."""
    pieces = _run_tiles(plan, image, run, batch_size, normalize, ranks, progress)
    gathered = ranks.gather(pieces)
    return None if gathered is None else _stitch(plan, gathered)


def _run_tiles(plan: TilePlan, image: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor], batch_size: int,
               normalize: Any, ranks: Ranks, progress: bool) -> list[tuple[Tile, torch.Tensor]]:
    """This rank's tiles (round-robin over all tiles), batched by shape; each tile's owned outputs."""
    mine = [t for i, t in enumerate(plan.tiles) if i % ranks.world == ranks.rank]
    by_shape: dict[tuple[int, int], list[Tile]] = {}
    for t in mine:
        by_shape.setdefault(t.shape, []).append(t)
    dtype = getattr(run, "dtype", torch.float32)
    pieces: list[tuple[Tile, torch.Tensor]] = []
    with terminal_bar(progress and ranks.rank == 0, total=len(mine), unit="tile", desc="convify: dense_map") as bar:
        for tiles in by_shape.values():
            for k in range(0, len(tiles), batch_size):
                batch = tiles[k:k + batch_size]
                x = torch.stack([image[:, t.rows.start:t.rows.stop, t.cols.start:t.cols.stop] for t in batch])
                out = run(convert_pixels(x, dtype, normalize))
                pieces.extend((t, _owned(plan, t, out[i:i + 1])) for i, t in enumerate(batch))
                if bar is not None:
                    bar.update(len(batch))
    return pieces


def _owned(plan: TilePlan, t: Tile, out: torch.Tensor) -> torch.Tensor:
    """The outputs tile ``t`` owns, out of its whole output (tile output j is one-pass output j + start/S)."""
    (sh, sw) = plan.geometry.stride
    r0, c0 = t.rows.first - t.rows.start // sh, t.cols.first - t.cols.start // sw
    r1, c1 = t.rows.end - t.rows.start // sh, t.cols.end - t.cols.start // sw
    if r0 < 0 or c0 < 0 or r1 > out.shape[2] or c1 > out.shape[3]:
        raise ConvifyError(f"internal error: the tile at rows {t.rows.start}:{t.rows.stop}, columns "
                           f"{t.cols.start}:{t.cols.stop} gave a {out.shape[2]}x{out.shape[3]} map that lacks "
                           f"outputs {r0}:{r1}, {c0}:{c1}; please report it with the model")
    return out[:, :, r0:r1, c0:c1].clone()


def _stitch(plan: TilePlan, pieces: list[tuple[Tile, torch.Tensor]]) -> torch.Tensor:
    first = pieces[0][1]
    result = torch.empty((1, first.shape[1], *plan.output), dtype=first.dtype)
    for t, piece in pieces:
        result[:, :, t.rows.first:t.rows.end, t.cols.first:t.cols.end] = piece
    return result
