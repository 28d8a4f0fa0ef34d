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
from typing import Any, Sequence

import torch
import torch.nn as nn

from convify.core.report import report
from convify.core.rewrites.head import is_dense as dense_report
from convify.dense.geometry import graph_geometry
from convify.dense.images import as_image, first_conv_channels
from convify.dense.runners import Ranks, runner
from convify.dense.stitching import Scan, run_and_stitch
from convify.dense.tiles import default_batch_size, default_tile, output_size, plan_tiles
from convify.errors import UsageError
from convify.fx import tracing
from convify.onnx.detect import is_onnx


def is_dense(model: nn.Module) -> bool:
    """Whether ``model`` was made fully convolutional by ``replace_linear_head(..., dense=True)``
    (or ``convify(..., dense=True)``): its report records a head pass with ``dense=True``."""
    return dense_report(report(model))


def dense_map(model: nn.Module | Any, image: torch.Tensor | str | os.PathLike, *, tile: int | None = None,
              batch_size: int | None = None, device: str | torch.device | None = None, progress: bool = True,
              onnx: str | os.PathLike | bool | None = None, provider: str = "cpu",
              normalize: tuple[Sequence[float], Sequence[float]] | None = None) -> torch.Tensor | None:
    """The score map ``model(image[None])`` would return, computed in tiles.

    Args:
        model: a fully convolutional 2-d model (``replace_linear_head(..., dense=True)``), in the
            train/eval mode it should run in (eval for BatchNorm); or a dense ONNX model (a ``.onnx``
            path, an ``onnx.ModelProto`` or an ``onnx_ir.Model``, made by ``replace_linear_head(model.onnx,
            dense=True)`` or exported with dynamic height and width), run in an onnxruntime session on
            ``provider``, its geometry read from its graph (:mod:`convify.dense.onnx_scan`).
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
        provider: with ``onnx`` or an ONNX model: ``"cpu"`` or ``"cuda"``; a provider that cannot run is an error,
            never a quiet CPU run.
        normalize: ``(mean, std)`` per channel, applied after the [0, 1] scaling.

    Returns:
        a (1, K, H', W') tensor on the CPU equal to the one-pass map (the tiles' outputs are exact,
        not blended). Under ``torchrun`` (``WORLD_SIZE > 1``) the ranks share the tiles round-robin
        and rank 0 stitches and returns the map; the other ranks return None.

    Raises:
        NotTilableError: the model is not fully convolutional (global or adaptive pooling,
            upsampling, a flatten); the message names the node.
        NotDenseError: an ONNX model rewritten without ``dense=True``, or whose input has a fixed size.

    >>> dense = convify.replace_linear_head(model, torch.randn(1, 3, 224, 224), dense=True)
    >>> convify.dense_map(dense, torch.rand(3, 8192, 8192)).shape
    torch.Size([1, 1000, 250, 250])
    """
    return scan(model, image, tile=tile, batch_size=batch_size, device=device, progress=progress, onnx=onnx,
                provider=provider, normalize=normalize).scores


def scan(model: nn.Module | Any, image: torch.Tensor | str | os.PathLike, *, tile: int | None = None,
         batch_size: int | None = None, device: str | torch.device | None = None, progress: bool = True,
         onnx: str | os.PathLike | bool | None = None, provider: str = "cpu",
         normalize: tuple[Sequence[float], Sequence[float]] | None = None) -> Scan:
    """:func:`dense_map` returning a :class:`Scan` record (the plan, the image as read)."""
    if is_onnx(model):
        _refuse_torch_only(onnx=onnx, device=device)
        from convify.dense.onnx_scan import scan_onnx  # noqa: PLC0415  (onnx and onnxruntime load here)

        return scan_onnx(model, image, tile=tile, batch_size=batch_size, progress=progress, provider=provider,
                         normalize=normalize)
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
        scores = run_and_stitch(plan, img, run, batch_size, normalize, Ranks.start(dev), progress)
    return Scan(scores, img, plan, batch_size, "torch" if onnx in (None, False) else f"onnxruntime ({provider})")


def _refuse_torch_only(**given: Any) -> None:
    named = [name for name, value in given.items() if value is not None and value is not False]
    if named:
        raise UsageError(f"{', '.join(f'{n}=' for n in named)}: an ONNX model runs in onnxruntime on the provider "
                         f"given by provider= ('cpu' or 'cuda'); leave {'it' if len(named) == 1 else 'them'} out")
