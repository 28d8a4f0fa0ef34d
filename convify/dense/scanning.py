"""``dense_map`` and ``scan``: score maps of images of any size, in tiles whose stitched map equals the one-pass map.

``dense_map(model, image)`` runs a fully convolutional model (one made by
``replace_linear_head(..., dense=True)``) over an image too large for one
pass: it plans the tiles (:mod:`convify.dense.tiles`), runs tiles of one shape
in batches (:mod:`convify.dense.runners`), keeps the outputs each tile owns
and stitches them.

>>> scores = convify.dense_map(dense, "slide.tiff", tile=1024)   # (1, K, H', W'), as dense(image[None])
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from convify.core.report import report
from convify.core.rewrites.head import is_dense as dense_report
from convify.dense.geometry import graph_geometry
from convify.dense.images import as_image, convert_pixels, first_conv_channels
from convify.dense.runners import Ranks, runner
from convify.dense.tiles import Tile, TilePlan, default_batch_size, default_tile, output_size, plan_tiles
from convify.errors import ConvifyError, UsageError
from convify.fx import tracing
from convify.progress import terminal_bar


def is_dense(model: nn.Module) -> bool:
    """Whether ``model`` was made fully convolutional by ``replace_linear_head(..., dense=True)``
    (or ``convify(..., dense=True)``): its report records a head pass with ``dense=True``."""
    return dense_report(report(model))


def dense_map(model: nn.Module, image: torch.Tensor | str | os.PathLike, *, tile: int | None = None,
              batch_size: int | None = None, device: str | torch.device | None = None, progress: bool = True,
              onnx: str | os.PathLike | bool | None = None, provider: str = "cpu",
              normalize: tuple[Sequence[float], Sequence[float]] | None = None) -> torch.Tensor | None:
    """The score map ``model(image[None])`` would return, computed in tiles.

    Args:
        model: a fully convolutional 2-d model (``replace_linear_head(..., dense=True)``), in the
            train/eval mode it should run in (eval for BatchNorm).
        image: a (C, H, W) or (1, C, H, W) tensor of any size and dtype, or a path to a PNG, JPEG or
            TIFF file. uint8 pixels (and files) become floats in [0, 1]; other dtypes are cast to the
            model's. The image is never copied whole: each tile is converted when it runs.
        tile: the tile side in input pixels (rounded up to a multiple of the stride; at least the
            receptive field plus one stride). Default: the largest whose activations fit the memory
            budget (:func:`default_tile`); the whole image when it is smaller.
        batch_size: tiles per forward pass (default: as many as fit the budget, at least 1).
        device: where the model runs (default: the model's).
        progress: show a progress bar on a terminal.
        onnx: run the tiles through onnxruntime: a path to the model's ONNX export with dynamic height
            and width, or ``True`` to export one to a temporary file. ``model`` still gives the geometry.
        provider: with ``onnx``: ``"cpu"`` or ``"cuda"``; a provider that cannot run is an error,
            never a quiet CPU run.
        normalize: ``(mean, std)`` per channel, applied after the [0, 1] scaling.

    Returns:
        a (1, K, H', W') tensor on the CPU equal to the one-pass map (the tiles' outputs are exact,
        not blended). Under ``torchrun`` (``WORLD_SIZE > 1``) the ranks share the tiles round-robin
        and rank 0 stitches and returns the map; the other ranks return None.

    Raises:
        NotTilableError: the model is not fully convolutional (global or adaptive pooling,
            upsampling, a flatten); the message names the node.

    >>> dense = convify.replace_linear_head(model, torch.randn(1, 3, 224, 224), dense=True)
    >>> convify.dense_map(dense, torch.rand(3, 8192, 8192)).shape
    torch.Size([1, 1000, 250, 250])
    """
    return scan(model, image, tile=tile, batch_size=batch_size, device=device, progress=progress, onnx=onnx,
                provider=provider, normalize=normalize).scores


@dataclass(frozen=True)
class Scan:
    """What :func:`scan` did: the map (None on ranks other than 0), the image it read, and the plan."""

    scores: torch.Tensor | None
    image: torch.Tensor
    plan: TilePlan
    batch_size: int
    runner: str


def scan(model: nn.Module, image: torch.Tensor | str | os.PathLike, *, tile: int | None = None,
         batch_size: int | None = None, device: str | torch.device | None = None, progress: bool = True,
         onnx: str | os.PathLike | bool | None = None, provider: str = "cpu",
         normalize: tuple[Sequence[float], Sequence[float]] | None = None) -> Scan:
    """:func:`dense_map` returning a :class:`Scan` record (the plan, the image as read)."""
    gm = tracing.trace(model)
    geometry = graph_geometry(gm)
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    dev = torch.device(device) if device is not None else (param.device if param is not None else
                                                           torch.device("cpu"))
    img = as_image(image, first_conv_channels(model) or 3)
    channels, height, width = img.shape
    full = output_size(gm, (1, channels, height, width), dtype)
    if tile is None:
        tile = default_tile(gm, geometry, channels, dev, dtype)
    elif tile < 1:
        raise UsageError(f"tile must be a positive number of pixels, not {tile}")
    plan = plan_tiles((height, width), (full[2], full[3]), geometry, tile)
    if batch_size is None:
        batch_size = default_batch_size(gm, plan, channels, dev, dtype)
    elif batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, not {batch_size}")
    with runner(model, dev, dtype, onnx, provider, (1, channels, height, width)) as run:
        ranks = Ranks.start(dev)
        pieces = _run_tiles(plan, img, run, batch_size, normalize, ranks, progress)
        gathered = ranks.gather(pieces)
    scores = None if gathered is None else _stitch(plan, full, gathered)
    return Scan(scores, img, plan, batch_size, "torch" if onnx in (None, False) else f"onnxruntime ({provider})")


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


def _stitch(plan: TilePlan, full: tuple[int, ...], pieces: list[tuple[Tile, torch.Tensor]]) -> torch.Tensor:
    first = pieces[0][1]
    result = torch.empty((1, first.shape[1], full[2], full[3]), dtype=first.dtype)
    for t, piece in pieces:
        result[:, :, t.rows.first:t.rows.end, t.cols.first:t.cols.end] = piece
    return result
