"""Receptive-field geometry and map sizes of a dense ONNX graph, from its nodes.

The ONNX side of :mod:`convify.dense.geometry`: the same :class:`Window`
arithmetic, walked over an ``onnx_ir`` graph in file (topological) order from
the image input. Every value that holds pixels is a :class:`Plane`: its
geometry, the tensor axes that hold height and width (a ``Transpose`` moves
them: tf2onnx's channels-last input, a Softmax between two Transposes), its
channels where the graph says them, and, for a given input size, its spatial
size. ``Conv``, ``MaxPool``, ``AveragePool`` and ``LpPool`` (kernel, strides,
pads, dilations, ``ceil_mode``; ``auto_pad`` SAME, whose padding at a stride over 1
depends on the size, is frozen at the one-pass size: :attr:`GraphWalk.frozen_pads`) and ``Pad`` (constant pads) move the
window; elementwise ops, ``BatchNormalization``, ``LRN``, a Softmax off the
spatial axes and a channel ``Concat`` keep it; a sum or product of maps takes
the union. Anything else on the pixels' path (``Flatten``, ``Reshape``,
global pooling, ``Resize``, ``Gemm``...) raises :class:`NotTilableError`
naming the node.

Why the graph and not the report the file carries: the report records what
the head rewrite did, not the trunk's convolutions, and a dense file need not
have been written by convify (``export_onnx(dense)`` of a PyTorch model).

>>> walk_graph(read_model("dense.onnx"), (224, 224)).geometry
Geometry(axes=(Axis(stride=32, size=404, offset=-4), Axis(stride=32, size=404, offset=-4)))
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import onnx_ir as ir

from convify.dense.geometry import IDENTITY, Geometry, NotTilableError, union_geometry
from convify.onnx.values import attribute, constant_value, label, opset_of_node


@dataclass(frozen=True)
class Plane:
    """A value that holds pixels: its window, the tensor axes of height and width, channels (None: unknown),
    its spatial size (None: the walk has no input size), its rank and its element size in bytes."""

    geometry: Geometry
    axes: tuple[int, int]
    channels: int | None
    size: tuple[int, int] | None
    rank: int
    itemsize: int

    def elements(self, fallback_channels: int) -> int:
        if self.size is None:
            return 0
        return (self.channels or fallback_channels) * self.size[0] * self.size[1]


@dataclass(frozen=True)
class GraphWalk:
    """What :func:`walk_graph` found: the output's geometry and size, the input's name and layout, and the
    largest (inputs + output) bytes of any node (for the memory budget)."""

    geometry: Geometry
    output: tuple[int, int] | None
    input_name: str
    channels_last: bool
    channels: int | None
    dtype: np.dtype
    peak_bytes: int
    frozen_pads: dict[int, list[int]]  # node index -> the explicit pads its auto_pad SAME gives at this size


def image_input(model: ir.Model) -> ir.Value:
    """The graph's image input: its first input that is not an initializer."""
    inputs = [v for v in model.graph.inputs if not v.is_initializer()]
    if not inputs:
        raise NotTilableError(f"the ONNX graph {model.graph.name or ''!r} takes no input")
    return inputs[0]


def is_channels_last(value: ir.Value) -> bool:
    """A rank-4 input read only by Transposes to channels first (tf2onnx's NHWC input)."""
    readers = [n for n, _ in value.uses()]
    return bool(readers) and all(n.op_type == "Transpose" and list(attribute(n, "perm") or []) == [0, 3, 1, 2]
                                 for n in readers)


def walk_graph(model: ir.Model, size: tuple[int, int] | None = None) -> GraphWalk:
    """The geometry of the graph's first output, and its spatial size for an input of ``size`` (H, W)."""
    x = image_input(model)
    if x.shape is not None and len(x.shape) != 4:
        raise NotTilableError(f"the ONNX input {x.name} has shape {_shape_text(x.shape)}: dense scanning takes "
                              "2-d images, (N, C, H, W) or tf2onnx's (N, H, W, C)")
    last = is_channels_last(x)
    axes = (1, 2) if last else (2, 3)
    channels = _dim(x.shape, 3 if last else 1)
    dtype = np.dtype(x.dtype.numpy()) if x.dtype is not None else np.dtype(np.float32)
    planes: dict[ir.Value, Plane] = {x: Plane(IDENTITY, axes, channels, size, 4, dtype.itemsize)}
    peak, widest = 0, channels or 1  # a map of unknown channels counts as the widest seen so far
    frozen: dict[int, list[int]] = {}
    for index, node in enumerate(model.graph):
        reading = [planes[v] for v in node.inputs if v is not None and v in planes]
        if not reading or node.op_type in _NO_PIXELS:
            continue
        if node.op_type in _SLIDING:
            out, pads = _sliding_node(node, reading)
            if pads is not None:
                frozen[index] = pads
        else:
            out = _node_plane(node, reading)
        planes[node.outputs[0]] = out
        widest = max(widest, out.channels or 0)
        peak = max(peak, sum(p.elements(widest) * p.itemsize for p in (*reading, out)))
    plane = _output_plane(model, planes)
    return GraphWalk(plane.geometry, plane.size, x.name, last, channels, dtype, peak, frozen)


def _output_plane(model: ir.Model, planes: dict[ir.Value, Plane]) -> Plane:
    out = model.graph.outputs[0]
    if out not in planes:
        raise NotTilableError(f"the ONNX output {out.name} does not depend on the image")
    plane = planes[out]
    if plane.axes != (2, 3) or plane.rank != 4:
        raise NotTilableError(f"the ONNX output {out.name} is not an (N, K, H', W') map (its height and width are "
                              f"axes {plane.axes} of {plane.rank})")
    return plane


def _dim(shape: ir.Shape | None, axis: int) -> int | None:
    if shape is None or axis >= len(shape):
        return None
    d = shape[axis]
    return d if isinstance(d, int) else None


def _shape_text(shape: ir.Shape) -> str:
    return "x".join(str(d if isinstance(d, int) else getattr(d, "value", d)) for d in shape)


def not_tilable(node: ir.Node, why: str) -> NotTilableError:
    return NotTilableError(f"ONNX node {label(node)!r} ({node.op_type}): {why}, so the model is not dense and "
                           "cannot be scanned in tiles; make it fully convolutional with {make_dense_onnx}")


# --------------------------------------------------------------------------- nodes


def _node_plane(node: ir.Node, reading: list[Plane]) -> Plane:
    rule = _RULES.get(node.op_type)
    if rule is not None:
        return rule(node, reading)
    if node.op_type in _KEEPS:
        return _combined(node, reading)
    why = _REFUSED.get(node.op_type, "convify cannot tell which input pixels each of its output positions reads")
    raise not_tilable(node, why)


def _combined(node: ir.Node, reading: list[Plane]) -> Plane:
    """An op position by position: one map (and constants), or the union of several maps' windows."""
    first = reading[0]
    for value in node.inputs:
        _check_broadcast(node, value, first)
    if len(reading) == 1:
        return first
    if any(p.axes != first.axes or p.rank != first.rank for p in reading):
        raise not_tilable(node, "it combines maps whose height and width lie on different axes")
    sizes = {p.size for p in reading}
    if len(sizes) > 1:
        raise not_tilable(node, f"it combines maps of sizes {sorted(s for s in sizes if s)}")
    geometry = union_geometry([p.geometry for p in reading], lambda why: not_tilable(node, why))
    channels = {p.channels for p in reading}
    return replace(first, geometry=geometry, channels=channels.pop() if len(channels) == 1 else None)


def _check_broadcast(node: ir.Node, value: ir.Value | None, plane: Plane) -> None:
    """A constant broadcast over the map that varies along height or width would pin the size: refuse it."""
    if node.op_type not in _BROADCASTING or value is None:
        return
    const = constant_value(value)
    if const is None or const.ndim < 2:
        return
    for axis in plane.axes:
        i = axis - (plane.rank - const.ndim)
        if 0 <= i < const.ndim and const.shape[i] != 1:
            raise not_tilable(node, f"it combines the map with {value.name} of shape "
                                    f"{'x'.join(map(str, const.shape))}, which has its own height or width")


def _concat(node: ir.Node, reading: list[Plane]) -> Plane:
    first = reading[0]
    axis = attribute(node, "axis", 0) % first.rank
    if axis in first.axes:
        raise not_tilable(node, f"it concatenates maps along their spatial axis {axis}")
    if len(reading) != len([v for v in node.inputs if v is not None]):
        raise not_tilable(node, "it concatenates the map with a constant")
    plane = _combined(node, reading)
    channels = [p.channels for p in reading]
    return replace(plane, channels=sum(channels) if None not in channels else None)  # type: ignore[arg-type]


def _softmax(node: ir.Node, reading: list[Plane]) -> Plane:
    (plane,) = reading
    opset = opset_of_node(node)
    axis = attribute(node, "axis", -1 if opset >= 13 else 1) % plane.rank
    over = {axis} if opset >= 13 else set(range(axis, plane.rank))  # before 13: coerced to 2-d from axis on
    if over & set(plane.axes):
        raise not_tilable(node, f"it normalizes over the spatial axis {sorted(over & set(plane.axes))[0]}")
    return plane


def _transpose(node: ir.Node, reading: list[Plane]) -> Plane:
    (plane,) = reading
    perm = list(attribute(node, "perm") or reversed(range(plane.rank)))
    axes = (perm.index(plane.axes[0]), perm.index(plane.axes[1]))
    if axes[0] > axes[1]:
        raise not_tilable(node, "it swaps height and width")
    return replace(plane, axes=axes)


def _ints(node: ir.Node, name: str, default: list[int]) -> list[int]:
    value = attribute(node, name)
    return list(value) if value else default


def _sliding(node: ir.Node, reading: list[Plane], kernel: list[int] | None,
             channels: int | None) -> tuple[Plane, list[int] | None]:
    """The plane after a convolution or pooling, and the pads an ``auto_pad`` SAME at a stride over 1 gives
    at this size (None otherwise): its padding depends on the map's size, so the scan freezes it at the
    one-pass size, which keeps every tile's grid that of the one pass."""
    (plane,) = reading
    if plane.axes != (2, 3) or plane.rank != 4:
        raise not_tilable(node, f"it slides over axes 2 and 3, not over the map's height and width {plane.axes}")
    if kernel is None or len(kernel) != 2:
        raise not_tilable(node, "its kernel is not a constant 2-d one")
    strides = _ints(node, "strides", [1, 1])
    dilations = _ints(node, "dilations", [1, 1])
    pads = _ints(node, "pads", [0, 0, 0, 0])
    auto_pad = attribute(node, "auto_pad", "NOTSET")
    frozen = None
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if strides != [1, 1] and plane.size is None:
            raise not_tilable(node, f"auto_pad={auto_pad} at stride {strides} pads by an amount that depends on "
                                    "the map's size, and the size is not known")
        lengths = plane.size or (1, 1)
        total = [max(0, (-(-n // s) - 1) * s + d * (k - 1) + 1 - n)
                 for n, k, s, d in zip(lengths, kernel, strides, dilations)]
        before = [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in total]
        pads = [*before, *(t - b for t, b in zip(total, before))]
        frozen = pads if strides != [1, 1] else None
    elif auto_pad == "VALID":
        pads = [0, 0, 0, 0]
    ceil = bool(attribute(node, "ceil_mode", 0))
    axes = tuple(a.after(kernel[i], strides[i], pads[i], dilations[i]) for i, a in enumerate(plane.geometry.axes))
    size = None
    if plane.size is not None:
        size = tuple(_slid(plane.size[i], kernel[i], strides[i], pads[i], pads[i + 2], dilations[i], ceil)
                     for i in range(2))
        if min(size) < 1:
            raise NotTilableError(f"ONNX node {label(node)!r} ({node.op_type}) gives an empty map on an input of "
                                  f"{plane.size[0]}x{plane.size[1]} at that layer: the image is too small")
    return replace(plane, geometry=Geometry(axes), size=size, channels=channels), frozen  # type: ignore[arg-type]


def _slid(length: int, k: int, s: int, before: int, after: int, d: int, ceil: bool) -> int:
    """Output length of a sliding window (with PyTorch's and onnxruntime's ceil_mode rule: the last window
    starts inside the input or its leading padding)."""
    span = length + before + after - d * (k - 1) - 1
    if not ceil:
        return span // s + 1
    out = -(-span // s) + 1
    return out - 1 if (out - 1) * s >= length + before else out


def _sliding_node(node: ir.Node, reading: list[Plane]) -> tuple[Plane, list[int] | None]:
    if node.op_type == "Conv":
        return _conv(node, reading)
    return _sliding(node, reading, _ints(node, "kernel_shape", []), reading[0].channels)


def _conv(node: ir.Node, reading: list[Plane]) -> tuple[Plane, list[int] | None]:
    weight = node.inputs[1]
    shape = list(weight.shape) if weight is not None and weight.shape is not None else None
    kernel = _ints(node, "kernel_shape", [d for d in shape[2:]] if shape else [])
    out_channels = shape[0] if shape and isinstance(shape[0], int) else None
    if len(reading) > 1:
        raise not_tilable(node, "its weights are computed from the image")
    return _sliding(node, reading, kernel if all(isinstance(k, int) for k in kernel) else None, out_channels)


def _pad(node: ir.Node, reading: list[Plane]) -> Plane:
    (plane,) = reading
    pads = attribute(node, "pads") if opset_of_node(node) < 11 else constant_value(node.inputs[1])
    if pads is None:
        raise not_tilable(node, "its pads are not constant")
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    axes_value = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3] is not None else None
    axes = list(range(plane.rank)) if axes_value is None else \
        [int(a) % plane.rank for a in np.asarray(constant_value(axes_value)).reshape(-1)]
    n = len(axes)
    before = {a: pads[i] for i, a in enumerate(axes)}
    after = {a: pads[i + n] for i, a in enumerate(axes)}
    geometry = Geometry(tuple(g.padded(before.get(a, 0)) for g, a in zip(plane.geometry.axes, plane.axes)))
    size = None if plane.size is None else \
        tuple(s + before.get(a, 0) + after.get(a, 0) for s, a in zip(plane.size, plane.axes))
    return replace(plane, geometry=geometry, size=size)  # type: ignore[arg-type]


_RULES: dict[str, Callable[[ir.Node, list[Plane]], Plane]] = {
    "Pad": _pad, "Concat": _concat,
    "Softmax": _softmax, "LogSoftmax": _softmax, "Hardmax": _softmax, "Transpose": _transpose,
}

#: Ops that act on each position alone (with constants broadcast over the map, or several maps).
_KEEPS = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Elu", "Selu", "Celu",
    "Gelu", "Mish", "Softplus", "Softsign", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Erf", "Floor",
    "Ceil", "Round", "Sign", "Identity", "Dropout", "Cast", "BatchNormalization", "LRN", "QuantizeLinear",
    "DequantizeLinear", "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "ThresholdedRelu",
    "Shrink",
})

#: Convolutions and poolings: a window slides over the map.
_SLIDING = frozenset({"Conv", "MaxPool", "AveragePool", "LpPool"})

#: Ops that broadcast their inputs numpy-style (a constant among them is checked along height and width).
_BROADCASTING = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "PRelu"})

#: Ops whose output holds no pixels though they read a map (sizes and shapes).
_NO_PIXELS = frozenset({"Shape", "Size"})

_REFUSED = {
    "Flatten": "it flattens the map", "Reshape": "it reshapes the map", "Squeeze": "it reshapes the map",
    "Unsqueeze": "it reshapes the map", "GlobalAveragePool": "global pooling reads the whole map",
    "GlobalMaxPool": "global pooling reads the whole map", "GlobalLpPool": "global pooling reads the whole map",
    "ReduceMean": "it reduces the map", "ReduceMax": "it reduces the map", "ReduceSum": "it reduces the map",
    "Resize": "it resamples the map", "Upsample": "it resamples the map", "Gemm": "a fully connected layer reads "
    "the whole (flattened) map", "MatMul": "a matrix product mixes positions", "ConvTranspose": "a transposed "
    "convolution spreads positions", "InstanceNormalization": "it normalizes over the whole map",
}


def peak_bytes_per_pixel(walk: GraphWalk, side: int) -> float:
    """The largest (inputs + output) bytes of any node per input pixel of a ``side`` x ``side`` tile."""
    return walk.peak_bytes / (side * side) if side > 0 else math.inf
