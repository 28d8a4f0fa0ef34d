"""``dense=True`` on an ONNX graph: the file takes inputs of any spatial size
and gives score maps.

The head's rebuild (:mod:`.building`) already leaves the graph outputs as
maps and removes what pinned the size inside the head (the flatten, a
global average pooling). What the file itself says about sizes is changed
here:

* the spatial axes of each image input of the graph become symbolic
  (``height``, ``width``; ``length`` in 1-d, ``depth`` first in 3-d): axes
  2 and on, or 1 and on for an input whose every reader is a Transpose from
  channels last (tf2onnx's NHWC input);
* the declared shapes of the intermediate maps (rank 3 and more), which
  held the size the model was exported at, are cleared (a runtime may trust
  them);
* a score-map graph output is declared ``(N, K, out_height, out_width)``,
  or ``(N, K, 1, 1)`` behind a global pooling that stays.

Something outside the head that pins the size (a ``Reshape`` to a constant
shape in the trunk) is not found here: such a file still refuses other sizes
when it runs.
"""
from __future__ import annotations

import onnx_ir as ir

from convify.core.rewrites.head import PoolRemoval
from convify.onnx.building import GraphEditor
from convify.onnx.rewrites.head.matching import Head
from convify.onnx.rewrites.head.plan import HeadPlan
from convify.onnx.values import attribute

#: The names of the symbolic spatial dimensions, by the number of spatial dimensions.
SPATIAL_NAMES = {1: ("length",), 2: ("height", "width"), 3: ("depth", "height", "width")}


def make_dense(edit: GraphEditor, head: Head, plan: HeadPlan, map_outputs: list[tuple[ir.Value, int]]) -> list[str]:
    """Free the input sizes and declare the score maps; notes on what changed."""
    notes = []
    freed = _free_input_sizes(edit.graph, head.dims)
    if freed:
        notes.append(f"dense: the graph input {', '.join(freed)} takes any spatial size now")
    cleared = _clear_map_shapes(edit.graph)
    if cleared:
        notes.append(f"dense: cleared the declared shapes of {cleared} intermediate maps (they held the exported size)")
    pinned = plan.removal is PoolRemoval.NONE and head.pool is not None and (head.pool.is_global or head.pool.fused)
    names = SPATIAL_NAMES[head.dims]
    for out, channels in map_outputs:
        spatial = [1] * head.dims if pinned else [ir.SymbolicDim(f"out_{n}") for n in names]
        out.shape = ir.Shape([head.batch, channels, *spatial])
    return notes


def _free_input_sizes(graph: ir.Graph, dims: int) -> list[str]:
    freed = []
    for value in graph.inputs:
        if value.is_initializer() or value.shape is None or len(value.shape) != dims + 2:
            continue
        if value.dtype is None or not value.dtype.is_floating_point():
            continue
        shape = list(value.shape)
        axes = _spatial_axes(value, dims)
        names = SPATIAL_NAMES[dims]
        if not any(isinstance(shape[a], int) for a in axes):
            continue
        for axis, name in zip(axes, names):
            if isinstance(shape[axis], int):
                shape[axis] = ir.SymbolicDim(name)
        value.shape = ir.Shape(shape)
        freed.append(f"{value.name} ({'x'.join(str(getattr(d, 'value', d)) for d in shape)})")
    return freed


def _spatial_axes(value: ir.Value, dims: int) -> list[int]:
    """Axes 2 and on; 1 and on for an input read only by Transposes from channels last."""
    readers = [n for n, _ in value.uses()]
    from_last = [0, dims + 1, *range(1, dims + 1)]
    if readers and all(n.op_type == "Transpose" and list(attribute(n, "perm") or []) == from_last for n in readers):
        return list(range(1, dims + 1))
    return list(range(2, dims + 2))


def _clear_map_shapes(graph: ir.Graph) -> int:
    cleared = 0
    for node in graph:
        for out in node.outputs:
            if out is not None and out.shape is not None and len(out.shape) >= 3 and not out.is_graph_output():
                out.shape = None
                cleared += 1
    return cleared
