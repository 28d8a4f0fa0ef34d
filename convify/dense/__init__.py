"""Score maps of images of any size, in tiles whose stitched map equals the one-pass map.

``dense_map(model, image)`` runs a fully convolutional model (one made by
``replace_linear_head(..., dense=True)``) over an image too large for one
pass. From the receptive-field geometry (:mod:`convify.geometry`: stride
``S``, window size ``R``, offset ``O``), each tile starts at a multiple of
``S``, so every layer's grid stays aligned and the tile's output ``j`` is the
one-pass output ``j + start/S``. A tile owns the outputs whose whole window
(padding taps included) lies inside it, or that reach past the image border
on a side where the tile ends at that border (there it sees the same padding
as the one pass). Tiles overlap by the halo this needs; the last tile of a
row ends exactly at the image border. Tiles of one shape run in batches; the
image stays as given (uint8 stays uint8) and each tile is converted when it
runs, so memory is the tile batch's, not the image's.

Per axis, for an image of ``L`` pixels, one-pass output size ``N`` and tile
side ``T`` (a multiple of ``S``, at least ``R + S``): starting at output
``j = 0``, a tile starts at ``a = max(0, floor((j*S + O)/S)*S)`` and ends at
``min(a + T, L)`` (a tile that would reach the border is moved back to end
exactly there), owns outputs ``j .. last exact``, and the next tile starts
from there.

>>> scores = convify.dense_map(dense, "slide.tiff", tile=1024)   # (1, K, H', W'), as dense(image[None])
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from convify.core.report import report
from convify.core.rewrites.head import is_dense as dense_report
from convify.dense.geometry import Axis, Geometry, NotTilableError, graph_geometry
from convify.errors import ConvifyError, DataError, UsageError, one_line
from convify.fx import copying, shapes, tracing
from convify.progress import terminal_bar

#: The default tile's memory budget on CPU: a quarter of the available memory, at most this.
CPU_BUDGET_CAP = 1 << 30
#: Activation memory is estimated as this many times the largest (input + output) of any node.
ACTIVATION_FACTOR = 2.0


@dataclass(frozen=True)
class Span:
    """One tile along one axis: input pixels ``[start, stop)``, owned one-pass outputs ``[first, end)``."""

    start: int
    stop: int
    first: int
    end: int

    @property
    def length(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Tile:
    """A 2-d tile: a span per axis."""

    rows: Span
    cols: Span

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows.length, self.cols.length)


@dataclass(frozen=True)
class TilePlan:
    """How an image is cut: the tiles, the one-pass output size, and the halo's cost."""

    image: tuple[int, int]
    output: tuple[int, int]
    geometry: Geometry
    tile: tuple[int, int]            # the tile side per axis, after rounding to the stride
    tiles: tuple[Tile, ...]

    @property
    def overhead(self) -> float:
        """Input pixels computed over image pixels (1.0: no halo)."""
        computed = sum(t.shape[0] * t.shape[1] for t in self.tiles)
        return computed / (self.image[0] * self.image[1])

    def groups(self) -> dict[tuple[int, int], list[Tile]]:
        """Tiles by shape (equal shapes run in one batch)."""
        out: dict[tuple[int, int], list[Tile]] = {}
        for t in self.tiles:
            out.setdefault(t.shape, []).append(t)
        return out


def is_dense(model: nn.Module) -> bool:
    """Whether ``model`` was made fully convolutional by ``replace_linear_head(..., dense=True)``
    (or ``convify(..., dense=True)``): its report records a head pass with ``dense=True``."""
    return dense_report(report(model))


# --------------------------------------------------------------------------- planning


def plan_axis(length: int, outputs: int, axis: Axis, tile: int) -> list[Span]:
    """Cut one axis of ``length`` pixels (``outputs`` one-pass outputs) into spans of ``tile`` pixels."""
    s, o, r = axis.stride, axis.offset, axis.size
    spans: list[Span] = []
    j = 0
    while j < outputs:
        start = max(0, ((j * s + o) // s) * s)
        if start + tile >= length:
            start = max(0, min(start, ((length - tile) // s) * s))
            spans.append(Span(start, length, j, outputs))
            break
        stop = start + tile
        end = min(outputs, (stop - o - r) // s + 1)  # the last output whose window ends inside the tile
        if end <= j:
            raise UsageError(f"tile={tile} is too small for a receptive field of {r} pixels at stride {s}: "
                             f"use at least {minimum_tile(axis)}")
        spans.append(Span(start, stop, j, end))
        j = end
    return spans


def minimum_tile(axis: Axis) -> int:
    """The smallest tile side that always owns an output: ``R + S`` rounded up to a multiple of ``S``."""
    return _round_up(axis.size + axis.stride, axis.stride)


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def plan_tiles(image: tuple[int, int], output: tuple[int, int], geometry: Geometry, tile: int) -> TilePlan:
    """The tiles of an image of ``image`` (H, W) pixels whose one-pass output is ``output`` (H', W')."""
    if min(output) < 1:
        raise UsageError(f"an image of {image[0]}x{image[1]} pixels gives an empty {output[0]}x{output[1]} map")
    sides = tuple(_tile_for(tile, a) for a in geometry.axes)
    rows = plan_axis(image[0], output[0], geometry.axes[0], sides[0])
    cols = plan_axis(image[1], output[1], geometry.axes[1], sides[1])
    return TilePlan(image, output, geometry, sides, tuple(Tile(r, c) for r in rows for c in cols))


def _tile_for(tile: int, axis: Axis) -> int:
    """``tile`` rounded up to a multiple of the stride, at least :func:`minimum_tile`."""
    return max(_round_up(tile, axis.stride), minimum_tile(axis))


# --------------------------------------------------------------------------- shapes and memory


def _meta_run(gm: fx.GraphModule, shape: tuple[int, ...], dtype: torch.dtype) -> dict[fx.Node, int]:
    """Run ``gm`` on meta tensors of ``shape``; returns each node's output bytes (and records shapes)."""
    x = torch.empty(shape, dtype=dtype, device="meta")
    try:
        with torch.no_grad(), copying.eval_mode(gm), shapes.meta_weights(gm):
            shapes.ShapeProp(gm).run(x)
    except Exception as e:
        raise NotTilableError(f"{type(gm).__name__} does not run on an input of shape "
                              f"{'x'.join(map(str, shape))}: {one_line(e)}") from e
    sizes: dict[fx.Node, int] = {}
    for n in gm.graph.nodes:
        info = shapes.info(n)
        if info is not None:
            sizes[n] = math.prod(info.shape) * info.dtype.itemsize
    return sizes


def output_size(gm: fx.GraphModule, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> tuple[int, ...]:
    """The model's output shape on an input of ``shape``, from shape propagation on meta tensors (no arithmetic)."""
    _meta_run(gm, shape, dtype)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    value = out.args[0]
    value = value[0] if isinstance(value, (tuple, list)) else value
    info = shapes.info(value) if isinstance(value, fx.Node) else None
    if info is None or len(info.shape) != 4:
        raise NotTilableError(f"{type(gm).__name__} does not return an (N, K, H', W') map on an input of shape "
                              f"{'x'.join(map(str, shape))}")
    return info.shape


def bytes_per_pixel(gm: fx.GraphModule, channels: int, side: int, dtype: torch.dtype = torch.float32) -> float:
    """Activation memory per input pixel of one tile: :data:`ACTIVATION_FACTOR` times the largest
    (inputs + output) bytes of any node, from meta shape propagation on a ``side`` x ``side`` tile."""
    sizes = _meta_run(gm, (1, channels, side, side), dtype)
    peak = max((sizes.get(n, 0) + sum(sizes.get(i, 0) for i in n.all_input_nodes) for n in gm.graph.nodes),
               default=0)
    return ACTIVATION_FACTOR * peak / (side * side)


def memory_budget(device: torch.device) -> int:
    """Bytes one batch of tiles may use: half the free memory on CUDA; on CPU a quarter of
    ``MemAvailable`` (/proc/meminfo), at most :data:`CPU_BUDGET_CAP`."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    available = _mem_available()
    return min(CPU_BUDGET_CAP, available // 4) if available else CPU_BUDGET_CAP // 2


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def default_tile(gm: fx.GraphModule, geometry: Geometry, channels: int, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> int:
    """The largest tile side (a multiple of the stride) whose activations fit :func:`memory_budget`,
    never below :func:`minimum_tile`."""
    smallest = max(minimum_tile(a) for a in geometry.axes)
    per_pixel = bytes_per_pixel(gm, channels, smallest, dtype)
    side = int(math.sqrt(memory_budget(device) / max(per_pixel, 1.0)))
    stride = max(geometry.stride)
    return max(smallest, (side // stride) * stride)


# --------------------------------------------------------------------------- images


def load_image(path: str | os.PathLike, channels: int = 3) -> torch.Tensor:
    """A PNG/JPEG/TIFF file as a uint8 (C, H, W) tensor (``channels`` 1: grayscale, 3: RGB)."""
    import numpy as np  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such image file")
    Image.MAX_IMAGE_PIXELS = None  # large scans are the point; the file is the user's own
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            array = np.asarray(im)
    except Exception as e:
        raise DataError(f"{path}: cannot read it as an image: {one_line(e)}") from e
    t = torch.from_numpy(array.copy())
    return t[None] if t.dim() == 2 else t.permute(2, 0, 1)


def _as_image(image: Any, channels: int) -> torch.Tensor:
    if isinstance(image, (str, os.PathLike)):
        return load_image(image, channels)
    if not isinstance(image, torch.Tensor):
        raise UsageError(f"image must be a (C, H, W) tensor, a (1, C, H, W) tensor or a path, not "
                         f"{type(image).__name__}")
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3:
        raise UsageError(f"image must be (C, H, W) or (1, C, H, W), not {tuple(image.shape)}")
    return image


def _first_conv_channels(model: nn.Module) -> int | None:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return None if conv is None else conv.in_channels


def _convert(tiles: torch.Tensor, dtype: torch.dtype, normalize: tuple[Sequence[float], Sequence[float]] | None
             ) -> torch.Tensor:
    """uint8 pixels become floats in [0, 1] (as torchvision's ToTensor); then ``(x - mean) / std``."""
    x = tiles.to(dtype) / 255 if tiles.dtype == torch.uint8 else tiles.to(dtype)
    if normalize is not None:
        mean, std = (torch.as_tensor(v, dtype=dtype, device=x.device).view(1, -1, 1, 1) for v in normalize)
        x = (x - mean) / std
    return x


# --------------------------------------------------------------------------- runners


class _TorchRunner:
    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        self.model, self.device, self.dtype = model, device, dtype

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.model(batch.to(self.device))
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out.cpu()


class _OrtRunner:
    """Tiles through an onnxruntime session, its provider checked as ``verify`` checks it."""

    def __init__(self, path: Path, provider: str) -> None:
        import onnxruntime as ort  # noqa: PLC0415

        from convify.export.verify import _provider, _session  # noqa: PLC0415

        self.session = _session(path, _provider(provider, ort), ort)
        self.name = self.session.get_inputs()[0].name
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        (out, *_) = self.session.run(None, {self.name: batch.numpy()})
        return torch.from_numpy(out)


# --------------------------------------------------------------------------- torchrun


@dataclass
class _Ranks:
    rank: int = 0
    world: int = 1
    owns_group: bool = False

    @classmethod
    def start(cls, device: torch.device) -> "_Ranks":
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


# --------------------------------------------------------------------------- dense_map


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
    img = _as_image(image, _first_conv_channels(model) or 3)
    channels, height, width = img.shape
    full = output_size(gm, (1, channels, height, width), dtype)
    if tile is None:
        tile = default_tile(gm, geometry, channels, dev, dtype)
    elif tile < 1:
        raise UsageError(f"tile must be a positive number of pixels, not {tile}")
    plan = plan_tiles((height, width), (full[2], full[3]), geometry, tile)
    if batch_size is None:
        per_pixel = bytes_per_pixel(gm, channels, max(minimum_tile(a) for a in geometry.axes), dtype)
        biggest = max(t.shape[0] * t.shape[1] for t in plan.tiles)
        batch_size = max(1, int(memory_budget(dev) // max(per_pixel * biggest, 1.0)))
    elif batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, not {batch_size}")
    with _runner(model, dev, dtype, onnx, provider, (1, channels, height, width)) as run:
        ranks = _Ranks.start(dev)
        pieces = _run_tiles(plan, img, run, batch_size, normalize, ranks, progress)
        gathered = ranks.gather(pieces)
    scores = None if gathered is None else _stitch(plan, full, gathered)
    return Scan(scores, img, plan, batch_size, "torch" if onnx in (None, False) else f"onnxruntime ({provider})")


class _runner:  # noqa: N801  (a context manager used as a function)
    """The torch model, or an onnxruntime session on a given or temporary ONNX file."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype, onnx: Any, provider: str,
                 shape: tuple[int, ...]) -> None:
        self.args = (model, device, dtype, onnx, provider, shape)
        self.tmp: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> Callable[[torch.Tensor], torch.Tensor]:
        model, device, dtype, onnx, provider, shape = self.args
        if onnx is None or onnx is False:
            return _TorchRunner(model, device, dtype)
        if onnx is True:
            import onnxruntime as ort  # noqa: PLC0415

            from convify.export.onnx import export_onnx  # noqa: PLC0415
            from convify.export.verify import _provider  # noqa: PLC0415

            _provider(provider, ort)  # an unavailable provider fails before the export, not after

            self.tmp = tempfile.TemporaryDirectory(prefix="convify-dense-")
            side = max(minimum_tile(a) for a in graph_geometry(tracing.trace(model)).axes)
            example = torch.zeros(1, shape[1], side, side, dtype=dtype)
            onnx = export_onnx(model.cpu() if device.type == "cpu" else model, Path(self.tmp.name) / "dense.onnx",
                               example, dynamic_spatial=True)
        path = Path(onnx)
        if not path.is_file():
            raise UsageError(f"onnx={str(path)!r}: no such ONNX file")
        return _OrtRunner(path, provider)

    def __exit__(self, *exc: Any) -> None:
        if self.tmp is not None:
            self.tmp.cleanup()


def _run_tiles(plan: TilePlan, image: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor], batch_size: int,
               normalize: Any, ranks: _Ranks, progress: bool) -> list[tuple[Tile, torch.Tensor]]:
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
                out = run(_convert(x, dtype, normalize))
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


def tile_plan(model: nn.Module, image_size: tuple[int, int], tile: int | None = None, channels: int = 3,
              device: str | torch.device = "cpu") -> TilePlan:
    """The tiles ``dense_map`` would cut an image of ``image_size`` (H, W) into (for benchmarks and reports)."""
    gm = tracing.trace(model)
    geometry = graph_geometry(gm)
    full = output_size(gm, (1, channels, *image_size))
    if tile is None:
        tile = default_tile(gm, geometry, channels, torch.device(device))
    return plan_tiles(tuple(image_size), (full[2], full[3]), geometry, tile)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- heat maps

#: A perceptually ordered colormap (viridis' ends and midpoints), interpolated linearly.
_STOPS = ((0.267, 0.005, 0.329), (0.231, 0.322, 0.546), (0.128, 0.567, 0.551), (0.369, 0.789, 0.383),
          (0.993, 0.906, 0.144))
HEATMAP_SIDE = 2048  # the longest side of a heat map picture


def colormap(values: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1] (any shape) to RGB in [0, 1] (shape + (3,))."""
    stops = torch.tensor(_STOPS)
    x = values.clamp(0, 1) * (len(_STOPS) - 1)
    low = x.floor().long().clamp(max=len(_STOPS) - 2)
    frac = (x - low)[..., None]
    return stops[low] * (1 - frac) + stops[low + 1] * frac


def class_colours(count: int) -> torch.Tensor:
    """``count`` distinct saturated colours (hues a golden angle apart), (count, 3) in [0, 1]."""
    import colorsys  # noqa: PLC0415

    return torch.tensor([colorsys.hsv_to_rgb((k * 0.618033988749895) % 1.0, 0.85, 1.0) for k in range(count)])


def heatmap(image: torch.Tensor, scores: torch.Tensor, geometry: Geometry, class_index: int | None = None,
            side: int = HEATMAP_SIDE) -> "Any":
    """A Pillow image: ``image`` (C, H, W, uint8 or in [0, 1]) dimmed, under the score map drawn at its
    windows' centres. With ``class_index``: that class's probability (softmax over the classes; sigmoid
    for one class) through :func:`colormap`; else each position in its top class's colour, as bright as
    that class's probability relative to the highest on the map. Scaled so that the longer side is at most ``side`` pixels."""
    from PIL import Image  # noqa: PLC0415

    k = scores.shape[1]
    if class_index is not None and not 0 <= class_index < k:
        raise UsageError(f"class {class_index} does not exist: the map has {k} classes (0 .. {k - 1})")
    logits = scores[0].float()
    probs = logits.sigmoid() if k == 1 else logits.softmax(0)
    if class_index is not None:
        rgb = colormap(probs[class_index])
    else:
        top, which = probs.max(0)
        rgb = class_colours(k)[which] * (top / top.max().clamp_min(1e-12))[..., None]
    heat = Image.fromarray((rgb * 255).round().to(torch.uint8).numpy(), "RGB")
    base = _picture(image)
    (sh, sw), (rh, rw), (oh, ow) = geometry.stride, geometry.size, geometry.offset
    # map position (i, j) is drawn over the stride-sized cell centred on its window's centre
    top_left = (ow + (rw - 1) / 2 - (sw - 1) / 2, oh + (rh - 1) / 2 - (sh - 1) / 2)
    heat = heat.resize((heat.width * sw, heat.height * sh), Image.NEAREST)
    layer = Image.new("RGB", base.size)
    layer.paste(heat, (round(top_left[0]), round(top_left[1])))
    mask = Image.new("L", base.size, 0)
    mask.paste(255, (round(top_left[0]), round(top_left[1]), round(top_left[0]) + heat.width,
                     round(top_left[1]) + heat.height))
    dimmed = Image.blend(base, Image.new("RGB", base.size), 0.5)
    out = Image.composite(Image.blend(dimmed, layer, 0.7), dimmed, mask)
    scale = min(1.0, side / max(out.size))
    if scale < 1.0:
        out = out.resize((max(1, round(out.width * scale)), max(1, round(out.height * scale))), Image.BILINEAR)
    return out


def _picture(image: torch.Tensor) -> "Any":
    from PIL import Image  # noqa: PLC0415

    x = image.detach().cpu()
    if x.dtype != torch.uint8:
        lo, hi = float(x.min()), float(x.max())
        x = ((x.float() - lo) / max(hi - lo, 1e-12) * 255).round().to(torch.uint8)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return Image.fromarray(x[:3].permute(1, 2, 0).contiguous().numpy(), "RGB")
