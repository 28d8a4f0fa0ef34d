"""Receptive-field geometry of a dense (fully convolutional) 2-d model.

Walking the traced graph in topological order, every node that holds a
feature map gets a :class:`Window` per spatial dimension: output index ``i``
reads input pixels ``[i*S + O, i*S + O + R - 1]`` (stride ``S``, receptive
size ``R``, offset ``O``; ``O`` is negative where padding reaches outside the
image, and the window counts padding taps as pixels). A convolution or
pooling with kernel ``k``, stride ``s``, padding ``p``, dilation ``d`` maps
``(S, R, O)`` to ``(S*s, R + d*(k-1)*S, O - p*S)``; elementwise ops,
BatchNorm and channel concatenation keep it; a sum or product of several
maps (residual blocks) takes the union of their windows and needs one
stride. Anything else that changes the spatial size (upsampling, global or
adaptive pooling, a flatten) makes the model not tilable: a
:class:`NotTilableError` names the node.

>>> dense = convify.replace_linear_head(torchvision.models.vgg11().eval(), torch.randn(1, 3, 224, 224), dense=True)
>>> print(convify.receptive_field(dense))
receptive field: stride 32x32, size 404x404, offset -4,-4 (output (i, j) reads input rows 32*i-4 .. 32*i+399)
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from convify.errors import ConvifyError, UsageError
from convify.fx import ops, tracing


class NotTilableError(ConvifyError):
    """A model whose output positions do not each read a fixed window of the
    input (global or adaptive pooling, upsampling, a flatten): it cannot be
    scanned in tiles."""


class NotDenseError(NotTilableError, UsageError):
    """A model file that was not made dense (a report without ``dense=True``, a fixed input size): a usage
    error too, since the caller chose the file."""


@dataclass(frozen=True)
class Axis:
    """One spatial dimension: output index ``i`` reads input pixels ``[i*stride + offset, i*stride + offset + size - 1]``."""

    stride: int
    size: int
    offset: int

    def after(self, kernel: int, stride: int, padding: int, dilation: int = 1) -> "Axis":
        """The window after a convolution or pooling on this axis."""
        return Axis(self.stride * stride, self.size + dilation * (kernel - 1) * self.stride,
                    self.offset - padding * self.stride)

    def padded(self, before: int) -> "Axis":
        return Axis(self.stride, self.size, self.offset - before * self.stride)

    def first(self, index: int) -> int:
        """The first input pixel output ``index`` reads."""
        return index * self.stride + self.offset

    def last(self, index: int) -> int:
        """The last input pixel output ``index`` reads."""
        return index * self.stride + self.offset + self.size - 1


@dataclass(frozen=True)
class Geometry:
    """Stride, receptive size and offset of a model's output, per spatial dimension (height, width)."""

    axes: tuple[Axis, ...]

    @property
    def stride(self) -> tuple[int, ...]:
        return tuple(a.stride for a in self.axes)

    @property
    def size(self) -> tuple[int, ...]:
        return tuple(a.size for a in self.axes)

    @property
    def offset(self) -> tuple[int, ...]:
        return tuple(a.offset for a in self.axes)

    def window(self, index: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
        """The input pixel range ``(first, last)`` per dimension that output ``index`` reads."""
        return tuple((a.first(i), a.last(i)) for a, i in zip(self.axes, index))

    def to_dict(self) -> dict[str, Any]:
        return {"stride": list(self.stride), "size": list(self.size), "offset": list(self.offset)}

    def __str__(self) -> str:
        h = self.axes[0]
        return (f"receptive field: stride {'x'.join(map(str, self.stride))}, size "
                f"{'x'.join(map(str, self.size))}, offset {','.join(map(str, self.offset))} (output (i, j) reads "
                f"input rows {h.stride}*i{h.offset:+d} .. {h.stride}*i{h.offset + h.size - 1:+d})")


IDENTITY = Geometry((Axis(1, 1, 0), Axis(1, 1, 0)))


def receptive_field(model: nn.Module) -> Geometry:
    """The geometry of ``model``'s output in input pixels (a 2-d model with one
    image input and one feature-map output, such as one made by
    ``replace_linear_head(..., dense=True)``).

    Raises :class:`NotTilableError` naming the first node whose output
    positions do not read a fixed window (global pooling, a flatten...).

    >>> convify.receptive_field(dense).stride
    (32, 32)
    """
    gm = model if isinstance(model, fx.GraphModule) else tracing.trace(model)
    return graph_geometry(gm)


def graph_geometry(gm: fx.GraphModule) -> Geometry:
    """:func:`receptive_field` of an already traced model."""
    windows: dict[fx.Node, Geometry] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not placeholders:
        raise NotTilableError(f"{type(gm).__name__} takes no input")
    windows[placeholders[0]] = IDENTITY
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        if node.op == "output":
            return _output_geometry(node, windows)
        reading = [windows[n] for n in node.all_input_nodes if n in windows]
        if not reading:
            continue  # a constant or shape computation: no pixels reach it
        windows[node] = _node_geometry(gm, node, reading)
    raise NotTilableError(f"{type(gm).__name__} has no output node")


def _output_geometry(node: fx.Node, windows: dict[fx.Node, Geometry]) -> Geometry:
    value = node.args[0]
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]
    if not isinstance(value, fx.Node):
        raise NotTilableError("the model returns several outputs or a container; dense scanning needs one "
                              "(N, K, H', W') score map")
    if value not in windows:
        raise NotTilableError(f"the model's output ({value.name}) does not depend on the image")
    return windows[value]


def _node_geometry(gm: fx.GraphModule, node: fx.Node, reading: list[Geometry]) -> Geometry:
    if len(reading) > 1:
        return _union(node, reading)
    (before,) = reading
    if node.op == "call_module":
        return _module_geometry(node, gm.get_submodule(node.target), before)
    if node.op == "call_function":
        rule = _FUNCTIONS.get(node.target)
        if rule is not None:
            return rule(gm, node, before)
    if _keeps_positions(gm, node):
        return before
    raise _not_tilable(node, "convify cannot tell which input pixels each of its output positions reads")


def _keeps_positions(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Ops that act on each position alone: elementwise, per-channel, and
    scalar arithmetic on one map."""
    if ops.elementwise_kind(gm, node) is not None or ops.is_per_channel(gm, node):
        return True
    if node.op == "call_function" and node.target in (*ops.SCALAR_OPERATORS, torch.cat, torch.concat):
        return node.target not in (torch.cat, torch.concat) or _cat_dim(node) in (1, -3)
    return node.op == "call_method" and node.target in {"contiguous", "clone", "float", "to", "type_as"}


def _union(node: fx.Node, reading: list[Geometry]) -> Geometry:
    """Several maps combined position by position (``a + b``, ``torch.cat``): the union of their windows."""
    if node.op == "call_function" and node.target in (torch.cat, torch.concat) and _cat_dim(node) not in (1, -3):
        raise _not_tilable(node, f"it concatenates feature maps along dimension {_cat_dim(node)}, not channels")
    if not (_keeps_positions_multi(node)):
        raise _not_tilable(node, "it combines several feature maps in a way convify does not know")
    return union_geometry(reading, lambda why: _not_tilable(node, why))


def union_geometry(reading: Sequence[Geometry], refuse: Callable[[str], Exception]) -> Geometry:
    """The geometry of a node that combines maps of these geometries (a sum,
    a channel concatenation): per axis, the span of their windows; maps of
    different strides are refused with ``refuse(why)`` (raised)."""
    axes = []
    for dim, group in enumerate(zip(*(g.axes for g in reading))):
        strides = {a.stride for a in group}
        if len(strides) > 1:
            raise refuse(f"it combines maps of strides {sorted(strides)} in spatial dimension {dim}")
        first = min(a.offset for a in group)
        last = max(a.offset + a.size - 1 for a in group)
        axes.append(Axis(group[0].stride, last - first + 1, first))
    return Geometry(tuple(axes))


_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div,
           torch.maximum, torch.minimum, torch.cat, torch.concat}
_BINARY_METHODS = {"add", "add_", "sub", "mul", "mul_", "div", "expand_as"}


def _keeps_positions_multi(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _BINARY
    return node.op == "call_method" and node.target in _BINARY_METHODS


def _cat_dim(node: fx.Node) -> Any:
    return node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)


def _not_tilable(node: fx.Node, why: str) -> NotTilableError:
    return NotTilableError(f"node {node.name!r} ({_describe(node)}): {why}, so the model is not dense and cannot "
                           "be scanned in tiles; make it fully convolutional with {make_dense}, "
                           "or cut the model before that node")


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target}"
    return f"{node.op} {getattr(node.target, '__name__', node.target)}"


# --------------------------------------------------------------------------- modules


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    value = tuple(value)
    return (value[0], value[0]) if len(value) == 1 else (int(value[0]), int(value[1]))


def _sliding(before: Geometry, kernel: Any, stride: Any, padding: Any, dilation: Any = 1) -> Geometry:
    k, s, d = _pair(kernel), _pair(stride if stride not in (None, ()) else kernel), _pair(dilation)
    if isinstance(padding, str):  # "valid", or "same" (stride 1): torch pads (total // 2) before
        p = (0, 0) if padding == "valid" else tuple(di * (ki - 1) // 2 for ki, di in zip(k, d))
    else:
        p = _pair(padding)
    return Geometry(tuple(a.after(k[i], s[i], p[i], d[i]) for i, a in enumerate(before.axes)))


def _module_geometry(node: fx.Node, m: nn.Module, before: Geometry) -> Geometry:
    if isinstance(m, nn.Conv2d):
        return _sliding(before, m.kernel_size, m.stride, m.padding, m.dilation)
    if isinstance(m, nn.MaxPool2d):
        return _sliding(before, m.kernel_size, m.stride, m.padding, m.dilation)
    if isinstance(m, nn.AvgPool2d):
        return _sliding(before, m.kernel_size, m.stride, m.padding)
    if isinstance(m, (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d)):
        left, _, top, _ = m.padding
        return Geometry((before.axes[0].padded(top), before.axes[1].padded(left)))
    if isinstance(m, (nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)):
        raise _not_tilable(node, f"{type(m).__name__}({m.output_size}) pools a window that depends on the "
                                 "input size")
    if isinstance(m, (*ops.ELEMENTWISE_MODULES, *ops.PER_CHANNEL_MODULES, nn.LocalResponseNorm)):
        return before
    raise _not_tilable(node, f"{type(m).__name__} is not a convolution, pooling or per-position op convify "
                             "knows")


# --------------------------------------------------------------------------- functions


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def _conv_function(gm: fx.GraphModule, node: fx.Node, before: Geometry) -> Geometry:
    weight = _arg(node, 1, "weight", None)
    if not isinstance(weight, fx.Node) or weight.op != "get_attr":
        raise _not_tilable(node, "its weight is not a parameter of the model")
    kernel = tuple(gm.get_parameter(weight.target).shape[2:]) if weight.target in dict(gm.named_parameters()) \
        else tuple(getattr(gm, weight.target).shape[2:])
    return _sliding(before, kernel, _arg(node, 3, "stride", 1), _arg(node, 4, "padding", 0),
                    _arg(node, 5, "dilation", 1))


def _pool_function(with_dilation: bool) -> Callable[[fx.GraphModule, fx.Node, Geometry], Geometry]:
    def rule(gm: fx.GraphModule, node: fx.Node, before: Geometry) -> Geometry:
        kernel = _arg(node, 1, "kernel_size", None)
        dilation = _arg(node, 4, "dilation", 1) if with_dilation else 1
        return _sliding(before, kernel, _arg(node, 2, "stride", None), _arg(node, 3, "padding", 0), dilation)
    return rule


def _pad_function(gm: fx.GraphModule, node: fx.Node, before: Geometry) -> Geometry:
    pad = tuple(_arg(node, 1, "pad", ()))
    if len(pad) < 2:
        raise _not_tilable(node, f"it pads by {pad!r}")
    left = pad[0]
    top = pad[2] if len(pad) >= 4 else 0
    return Geometry((before.axes[0].padded(top), before.axes[1].padded(left)))


def _adaptive(gm: fx.GraphModule, node: fx.Node, before: Geometry) -> Geometry:
    raise _not_tilable(node, "adaptive pooling reads a window that depends on the input size")


def _interpolate(gm: fx.GraphModule, node: fx.Node, before: Geometry) -> Geometry:
    raise _not_tilable(node, "it resamples the map")


def _reshape(gm: fx.GraphModule, node: fx.Node, before: Geometry) -> Geometry:
    raise _not_tilable(node, "it reshapes or reduces the spatial dimensions")


def _elementwise_function(gm: fx.GraphModule, node: fx.Node, before: Geometry) -> Geometry:
    return before


_FUNCTIONS: dict[Callable, Callable[[fx.GraphModule, fx.Node, Geometry], Geometry]] = {
    F.conv2d: _conv_function, torch.conv2d: _conv_function,
    F.max_pool2d: _pool_function(True), torch.max_pool2d: _pool_function(True),
    F.avg_pool2d: _pool_function(False), torch._C._nn.avg_pool2d: _pool_function(False),
    F.pad: _pad_function, torch.constant_pad_nd: _pad_function,
    F.adaptive_avg_pool2d: _adaptive, F.adaptive_max_pool2d: _adaptive, torch.mean: _reshape,
    F.interpolate: _interpolate, torch.flatten: _reshape,
    F.batch_norm: _elementwise_function, F.local_response_norm: _elementwise_function,
}
