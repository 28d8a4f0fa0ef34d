"""Finding heads in an ONNX graph: walking back from a fully connected layer
to the map it reads, and forward to the outputs it feeds.

Nothing here changes the graph. Walking back from the first layer's input::

    map (N, C, *S) -[pooling]-[per-position ops]-> P -[Transpose to channels last]-> flatten -> (N, F)
        -[per-position ops]-> Gemm | MatMul(+Add)

where the flatten is a ``Flatten(axis=1)``, or a ``Reshape`` (its shape a
constant such as ``[-1, F]``, ``[N, F]``, ``[0, -1]``, or computed, as
``Shape -> Gather -> Unsqueeze -> Concat`` computes it) or ``Squeeze`` whose
output is ``(N, C*prod(S))`` as inferred; or a ``ReduceMean``/``ReduceMax``
over the spatial axes with ``keepdims=0``, which pools and flattens at once.
The pooling is a ``GlobalAveragePool``/``GlobalMaxPool``, a
``ReduceMean``/``ReduceMax`` over the spatial axes with ``keepdims=1``, or an
``AveragePool`` (global when its window is the map, an identity when it is
1, else it resamples). Forward (:func:`head_tree`): the layers that read the
first one's result through per-position ops (``Relu``, ``Dropout``,
``Identity``, ...) and inference ``BatchNormalization``; a ``Softmax`` over
the classes is noted for ``dense``. The result is a :class:`Head`.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from convify.onnx.rewrites.head.reading import (CLASS_AXIS, Linear, is_batchnorm, is_linear_candidate, is_standard,
                                                per_position, read_linear, spatial_axes)
from convify.onnx.values import Dim, ShapeTable, ValueInfo, attribute, constant_value, label, opset_of_node

#: The spatial dimensions a head's map may have (ONNX's Conv takes 1-, 2- and 3-d kernels here).
MAX_DIMS = 3


class PoolKind(enum.Enum):
    """What the pooling in front of a head computes."""

    AVG = "avg"    # an average: commutes with the head's first convolution
    MAX = "max"


@dataclass(frozen=True)
class Pool:
    """The pooling in front of a head. ``fused``: a reduction with
    ``keepdims=0``, which is the head's flatten too. ``source_spatial``: the
    pooled map's static spatial size (None where dynamic)."""

    node: ir.Node
    source: ir.Value
    kind: PoolKind
    is_global: bool
    is_identity: bool
    desc: str
    source_spatial: tuple[int | None, ...]
    fused: bool = False


#: One step of a head after its first layer: a layer, or a per-position node (an activation, a BatchNormalization).
Step = Linear | ir.Node


@dataclass(frozen=True)
class Head:
    """Everything one head rewrite needs, found on the graph.

    ``map_value``: P, the ``(N, C, *S)`` map flattened, channels first (None:
    ``pool`` is a reduction that flattens); ``transpose``: the Transpose to
    channels last between P and the flatten (tf2onnx's NHWC flatten), whose
    order the first layer's weight is in; ``tree``: the layers and the
    per-position nodes after the first layer's input, in graph order;
    ``class_ops``: Softmax/LogSoftmax nodes over the classes that read a value of the tree;
    ``reshapes``: Reshapes between the flatten and the first layer that leave the ``(N, F)`` vector as it is.
    """

    dims: int
    channels: int
    spatial: tuple[int, ...]
    flatten: ir.Node
    map_value: ir.Value | None
    transpose: ir.Node | None
    pool: Pool | None
    between: tuple[ir.Node, ...]
    pre_ops: tuple[ir.Node, ...]
    batch: Dim
    opset: int
    tree: tuple[Step, ...] = ()
    class_ops: tuple[ir.Node, ...] = ()
    reshapes: tuple[ir.Node, ...] = ()

    @property
    def linears(self) -> tuple[Linear, ...]:
        return tuple(s for s in self.tree if isinstance(s, Linear))

    @property
    def first(self) -> Linear:
        return self.linears[0]

    def channel_major_weight(self) -> np.ndarray:
        """The first layer's ``(K, F)`` weight with its features in the order
        ``torch.flatten`` gives a ``(C, *S)`` map (channels first), which is a
        convolution kernel's: permuted from channels last behind a Transpose."""
        weight = self.first.weight
        if self.transpose is None:
            return weight
        k = weight.shape[0]
        return np.moveaxis(weight.reshape(k, *self.spatial, self.channels), -1, 1).reshape(k, -1)

    def describe(self) -> str:
        """The row's ``old`` column: ``GlobalAveragePool -> Flatten(512x1x1) -> Gemm 512->1000``."""
        sizes = "->".join([str(self.first.features)] + [str(lin.classes) for lin in self.linears])
        ops = "/".join(dict.fromkeys(lin.describe() for lin in self.linears))
        if self.pool is not None and self.pool.fused:
            return f"{self.pool.desc} -> {ops} {sizes}"
        front = f"{self.pool.node.op_type} -> " if self.pool is not None and (
            self.pool.is_global or self.pool.fused) else ""
        space = "x".join(map(str, (self.channels, *self.spatial)))
        nhwc = "Transpose(channels last) -> " if self.transpose is not None else ""
        return f"{front}{nhwc}{self.flatten.op_type}({space}) -> {ops} {sizes}"


# --------------------------------------------------------------------------- walking back


def walk_back(linear: ir.Node, shapes: ShapeTable) -> Head | str | None:
    """The head in front of ``linear`` (without its tree), a reason it cannot
    be rewritten (a str), or None when ``linear`` reads no flattened map."""
    pre_ops: list[ir.Node] = []
    reshapes: list[ir.Node] = []
    cur = linear.inputs[0] if linear.inputs else None
    while cur is not None and shapes.of(cur).rank == 2:
        if per_position(cur.producer()):
            pre_ops.insert(0, cur.producer())
        elif _keeps_vector(cur.producer(), shapes):
            reshapes.append(cur.producer())
        else:
            break
        cur = cur.producer().inputs[0]
    if cur is None:
        return None
    flat = cur.producer()
    fused = _fused_reduction(flat, shapes)
    if fused is not None:
        inp = shapes.of(fused.source)
        dims = inp.rank - 2
        return Head(dims, inp.channels, (1,) * dims, flat, None, None, fused, (), tuple(pre_ops), inp.shape[0],
                    opset_of_node(flat), reshapes=tuple(reshapes))
    if flat is None or not _flattens(flat, shapes):
        return None
    map_value = flat.inputs[0]
    transpose = None
    if is_standard(map_value.producer(), "Transpose"):
        transpose = map_value.producer()
        rank = shapes.of(map_value).rank
        perm = list(attribute(transpose, "perm") or [])
        if rank is None or perm != [0, *range(2, rank), 1]:
            return (f"the flattened map comes from {label(transpose)} (Transpose perm={perm}), which rearranges its "
                    "dimensions otherwise than to channels last; no convolution kernel matches its features' order")
        map_value = transpose.inputs[0]
    info = shapes.of(map_value)
    reason = _map_reason(info)
    if reason:
        return reason
    between: list[ir.Node] = []
    walk = map_value
    while per_position(walk.producer()):
        between.insert(0, walk.producer())
        walk = walk.producer().inputs[0]
    pool = _pool(walk.producer(), shapes)
    if pool is None:
        between = []  # nothing to move the head across: the map is P itself
    return Head(info.rank - 2, info.channels, tuple(info.shape[2:]), flat, map_value, transpose, pool,
                tuple(between), tuple(pre_ops), info.shape[0], opset_of_node(flat), reshapes=tuple(reshapes))


def _map_reason(info: ValueInfo) -> str | None:
    if info.rank is None or info.rank < 3:
        return None if info.rank is not None else "the rank of the flattened map is unknown (no shape was inferred)"
    if info.rank - 2 > MAX_DIMS:
        return (f"the flattened map has {info.rank - 2} spatial dimensions; convify rewrites heads on 1-, 2- and "
                "3-d maps")
    if info.channels is None or any(not isinstance(d, int) for d in info.shape[1:]):
        return (f"the flattened map ({info.describe()}) has no static size; the first layer's convolution kernel is "
                "that size: give the model a static input size")
    return None


def _flattens(node: ir.Node, shapes: ShapeTable) -> bool:
    """Whether ``node`` flattens an ``(N, C, *S)`` map to ``(N, C*prod(S))``."""
    if not is_standard(node, "Flatten", "Reshape", "Squeeze"):
        return False
    inp, out = shapes.of(node.inputs[0]), shapes.of(node.outputs[0])
    if inp.rank is None or inp.rank < 3:
        return False
    if node.op_type == "Flatten":
        return attribute(node, "axis", 1) % inp.rank == 1
    if any(not isinstance(d, int) for d in inp.shape[1:]):
        return False
    features = math.prod(inp.shape[1:])
    target = _reshape_target(node, shapes) if node.op_type == "Reshape" else None
    if target is not None and len(target) == 2:
        first, second = target
        allowzero = attribute(node, "allowzero", 0)
        keeps_batch = (first == BATCH or (first == 0 and not allowzero) or (first == -1 and second == features)
                       or (isinstance(inp.shape[0], int) and first == inp.shape[0]))
        return keeps_batch and (second == features or (second == -1 and first != -1))
    if out.rank != 2 or inp.shape[0] is None or inp.shape[0] != out.shape[0]:
        return False
    return out.dim(1) == features


def _keeps_vector(node: ir.Node | None, shapes: ShapeTable) -> bool:
    """A Reshape, Flatten or Squeeze of an ``(N, F)`` value that leaves it
    ``(N, F)`` (tf2onnx's Reshape ``[-1, C]`` after a ReduceMean with ``keepdims=0``)."""
    if not is_standard(node, "Reshape", "Flatten", "Squeeze") or not node.inputs or node.inputs[0] is None:
        return False
    inp, out = shapes.of(node.inputs[0]), shapes.of(node.outputs[0])
    return inp.rank == 2 and inp.static is not None and inp.static == out.static


#: A Reshape's shape entry that is the input's own batch size, read off it by ``Shape -> Gather``.
BATCH = "batch"


def _reshape_target(node: ir.Node, shapes: ShapeTable) -> list[int | str] | None:
    """A Reshape's shape as constant entries and :data:`BATCH`, where it is a
    constant or a ``Concat`` of constants and ``Unsqueeze(Gather(Shape(x), 0))``
    of an ``x`` with the Reshape input's batch size (tf2onnx's computed
    shape, which shape inference does not always follow); else None."""
    return _shape_entries(node.inputs[1] if len(node.inputs) > 1 else None, shapes.of(node.inputs[0]), shapes)


def _shape_entries(value: ir.Value | None, data: ValueInfo, shapes: ShapeTable) -> list[int | str] | None:
    if value is None:
        return None
    const = constant_value(value)
    if const is not None:
        return [int(d) for d in const.reshape(-1)]
    node = value.producer()
    if is_standard(node, "Concat"):
        parts = [_shape_entries(v, data, shapes) for v in node.inputs]
        return None if any(p is None for p in parts) else [e for p in parts for e in p]
    scalar = is_standard(node, "Unsqueeze")
    gather = node.inputs[0].producer() if scalar else node
    if not is_standard(gather, "Gather") or attribute(gather, "axis", 0) != 0:
        return None
    index = constant_value(gather.inputs[1])
    shape_of = gather.inputs[0].producer()
    if index is None or index.reshape(-1).tolist() != [0] or (index.ndim == 0) != scalar:
        return None
    if not is_standard(shape_of, "Shape") or attribute(shape_of, "start", 0) != 0:
        return None
    batch = shapes.of(shape_of.inputs[0]).shape
    return [BATCH] if batch and data.shape and batch[0] is not None and batch[0] == data.shape[0] else None


def _fused_reduction(node: ir.Node | None, shapes: ShapeTable) -> Pool | None:
    """A ReduceMean or ReduceMax over the spatial axes with ``keepdims=0``: a pooling and a flatten."""
    if not is_standard(node, "ReduceMean", "ReduceMax") or attribute(node, "keepdims", 1):
        return None
    pool = _reduction(node, shapes)
    return None if pool is None else Pool(pool.node, pool.source, pool.kind, True, pool.is_identity,
                                          f"{node.op_type}(spatial, keepdims=0)", pool.source_spatial, fused=True)


def _reduction(node: ir.Node, shapes: ShapeTable) -> Pool | None:
    inp = shapes.of(node.inputs[0])
    if inp.rank is None or inp.rank < 3 or inp.rank - 2 > MAX_DIMS or inp.channels is None:
        return None
    if spatial_axes(node, inp.rank) != list(range(2, inp.rank)):
        return None
    kind = PoolKind.AVG if node.op_type == "ReduceMean" else PoolKind.MAX
    spatial = tuple(inp.dim(a) for a in range(2, inp.rank))
    return Pool(node, node.inputs[0], kind, True, all(s == 1 for s in spatial), f"{node.op_type}(spatial)", spatial)


def _pool(node: ir.Node | None, shapes: ShapeTable) -> Pool | None:
    """``node`` as a pooling that can sit in front of a head's flatten."""
    if node is None or not node.inputs or node.inputs[0] is None:
        return None
    inp, out = shapes.of(node.inputs[0]), shapes.of(node.outputs[0])
    if inp.rank is None or inp.rank < 3 or out.rank != inp.rank:
        return None
    spatial = tuple(inp.dim(a) for a in range(2, inp.rank))
    identity = all(s == 1 for s in spatial)
    if is_standard(node, "GlobalAveragePool", "GlobalMaxPool"):
        kind = PoolKind.AVG if node.op_type == "GlobalAveragePool" else PoolKind.MAX
        return Pool(node, node.inputs[0], kind, True, identity, node.op_type, spatial)
    if is_standard(node, "ReduceMean", "ReduceMax") and attribute(node, "keepdims", 1):
        return _reduction(node, shapes)
    if is_standard(node, "AveragePool"):
        return _average_pool(node, spatial, tuple(out.dim(a) for a in range(2, out.rank)))
    return None


def _average_pool(node: ir.Node, spatial: tuple[int | None, ...], out: tuple[int | None, ...]) -> Pool:
    kernel = tuple(attribute(node, "kernel_shape") or ())
    strides = tuple(attribute(node, "strides") or (1,) * len(kernel))
    auto_pad = attribute(node, "auto_pad", "NOTSET") or "NOTSET"
    unpadded = auto_pad in ("NOTSET", "VALID") and not any(attribute(node, "pads") or ()) and not any(
        d != 1 for d in attribute(node, "dilations") or ())
    is_global = unpadded and kernel == spatial and all(o == 1 for o in out)
    is_identity = unpadded and all(k == 1 for k in kernel) and all(s == 1 for s in strides)
    desc = f"AveragePool(kernel {'x'.join(map(str, kernel))})"
    return Pool(node, node.inputs[0], PoolKind.AVG, is_global, is_identity or (is_global and all(
        s == 1 for s in spatial)), desc, spatial)


# --------------------------------------------------------------------------- walking forward


def head_tree(first: Linear, shapes: ShapeTable, ir_version: int, order: dict[ir.Node, int]
              ) -> tuple[tuple[Step, ...], tuple[ir.Node, ...]]:
    """The layers and per-position nodes reachable from ``first`` through each
    other, in graph order, and the class-axis ops (Softmax) reading them; every
    other reader is a boundary, which receives the flattened value."""
    steps: dict[ir.Node, Step] = {first.node: first}
    class_ops: list[ir.Node] = []
    frontier = [first.output]
    while frontier:
        value = frontier.pop()
        for user, index in value.uses():
            if user in steps or index != 0:
                continue
            step = _step(user, shapes, ir_version)
            if step is not None:
                steps[user] = step
                frontier.append(step.output if isinstance(step, Linear) else user.outputs[0])
            elif _over_classes(user) and user not in class_ops:
                class_ops.append(user)
    ordered = tuple(steps[n] for n in sorted(steps, key=order.__getitem__))
    return ordered, tuple(class_ops)


def _step(node: ir.Node, shapes: ShapeTable, ir_version: int) -> Step | None:
    if is_linear_candidate(node, ir_version):
        found = read_linear(node, shapes, ir_version)
        return found if isinstance(found, Linear) else None
    if per_position(node) or is_batchnorm(node):
        return node
    return None


def _over_classes(node: ir.Node) -> bool:
    """A Softmax or LogSoftmax over the last axis of (one of the head's) ``(N, K)`` values."""
    if not is_standard(node, *CLASS_AXIS):
        return False
    default = -1 if opset_of_node(node) >= 13 else 1
    return attribute(node, "axis", default) in (1, -1)


def step_output(step: Step) -> ir.Value:
    return step.output if isinstance(step, Linear) else step.outputs[0]


def step_input(step: Step) -> ir.Value:
    return step.input if isinstance(step, Linear) else step.inputs[0]


def feeds_a_map(value: ir.Value, shapes: ShapeTable) -> bool:
    """Whether anything computed from ``value`` has spatial dimensions again
    (squeeze-excitation gates, attention mixed back into a feature map)."""
    seen, frontier = {value}, [value]
    while frontier:
        for user in dict.fromkeys(n for n, _ in frontier.pop().uses()):
            for out in user.outputs:
                if out is None or out in seen:
                    continue
                if (shapes.of(out).rank or 0) >= 3:
                    return True
                seen.add(out)
                frontier.append(out)
    return False


def reaches_output(value: ir.Value) -> bool:
    seen, frontier = {value}, [value]
    while frontier:
        cur = frontier.pop()
        if cur.is_graph_output():
            return True
        for user in dict.fromkeys(n for n, _ in cur.uses()):
            for out in user.outputs:
                if out is not None and out not in seen:
                    seen.add(out)
                    frontier.append(out)
    return False
