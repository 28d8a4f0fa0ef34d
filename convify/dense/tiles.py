"""Tile planning and the memory budget: where the tiles of an image start and end, and how large they may be.

From the receptive-field geometry (:mod:`convify.dense.geometry`: stride
``S``, window size ``R``, offset ``O``), each tile starts at a multiple of
``S``, so every layer's grid stays aligned and the tile's output ``j`` is the
one-pass output ``j + start/S``. A tile owns the outputs whose whole window
(padding taps included) lies inside it, or that reach past the image border
on a side where the tile ends at that border (there it sees the same padding
as the one pass). Tiles overlap by the halo this needs; the last tile of a
row ends exactly at the image border.

Per axis, for an image of ``L`` pixels, one-pass output size ``N`` and tile
side ``T`` (a multiple of ``S``, at least ``R + S``): starting at output
``j = 0``, a tile starts at ``a = max(0, floor((j*S + O)/S)*S)`` and ends at
``min(a + T, L)`` (a tile that would reach the border is moved back to end
exactly there), owns outputs ``j .. last exact``, and the next tile starts
from there.

The default tile side and batch size are the largest whose activations
(estimated by shape propagation on meta tensors) fit :func:`memory_budget`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from convify.dense.geometry import Axis, Geometry, NotTilableError, graph_geometry
from convify.errors import UsageError, one_line
from convify.fx import copying, shapes, tracing

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


def tile_plan(model: nn.Module, image_size: tuple[int, int], tile: int | None = None, channels: int = 3,
              device: str | torch.device = "cpu") -> TilePlan:
    """The tiles ``dense_map`` would cut an image of ``image_size`` (H, W) into (for benchmarks and reports)."""
    gm = tracing.trace(model)
    geometry = graph_geometry(gm)
    full = output_size(gm, (1, channels, *image_size))
    if tile is None:
        tile = default_tile(gm, geometry, channels, torch.device(device))
    return plan_tiles(tuple(image_size), (full[2], full[3]), geometry, tile)  # type: ignore[arg-type]


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
    return tile_for_budget(bytes_per_pixel(gm, channels, smallest, dtype), geometry, device)


def tile_for_budget(per_pixel: float, geometry: Geometry, device: torch.device) -> int:
    """The largest tile side (a multiple of the stride, at least :func:`minimum_tile`) whose ``per_pixel``
    activation bytes fit :func:`memory_budget`."""
    smallest = max(minimum_tile(a) for a in geometry.axes)
    side = int(math.sqrt(memory_budget(device) / max(per_pixel, 1.0)))
    stride = max(geometry.stride)
    return max(smallest, (side // stride) * stride)


def default_batch_size(gm: fx.GraphModule, plan: TilePlan, channels: int, device: torch.device,
                       dtype: torch.dtype = torch.float32) -> int:
    """How many of ``plan``'s largest tiles fit :func:`memory_budget` in one batch, at least 1."""
    per_pixel = bytes_per_pixel(gm, channels, max(minimum_tile(a) for a in plan.geometry.axes), dtype)
    return batch_for_budget(per_pixel, plan, device)


def batch_for_budget(per_pixel: float, plan: TilePlan, device: torch.device) -> int:
    """How many of ``plan``'s largest tiles of ``per_pixel`` activation bytes fit :func:`memory_budget`."""
    biggest = max(t.shape[0] * t.shape[1] for t in plan.tiles)
    return max(1, int(memory_budget(device) // max(per_pixel * biggest, 1.0)))
