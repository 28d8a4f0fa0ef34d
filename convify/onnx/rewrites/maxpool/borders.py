"""Borders for an exact max pooling of a signed input: padding whose every
tap copies a valid tap of its own window (why that is exact:
``convify/fx/rewrites/maxpool/padding.py``; the same padding as the torch.fx
frontend's ``TapPad``).

* along an axis with dilation 1: edge replication, one ``Pad`` node
  (``mode="edge"``; pads as an input from opset 11, as the ``pads``
  attribute from 2, ``paddings`` in opset 1);
* along an axis with dilation ``d``: the first (last) ``d`` elements
  repeated, a ``Gather`` of each side's indices and a ``Concat``: position
  ``-j`` copies ``(-j) mod d``, position ``n - 1 + j`` copies
  ``n - 1 + j - d ceil(j / d)``. At a static size the indices are plain;
  at a dynamic one the end's are negative (from the end), which ``Gather``
  takes from opset 11 (before it, such a site is skipped). Below ``d``
  elements along that axis (where a window holds padding only) ``Gather``'s
  indices run past the input and onnxruntime raises.

A non-negative input needs none of this: its zeros go inside the first
convolutions' pads (:mod:`.exact`).
"""
from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from convify.onnx.building import GraphEditor
from convify.onnx.rewrites.maxpool.window import PoolSite

#: The first opset whose Pad takes its pads as an input, and whose Gather takes negative indices.
PADS_AS_INPUT = NEGATIVE_INDICES = 11

COPIES = "padding copies a valid tap of each window"


def dynamic_residue_reason(pool: PoolSite) -> str | None:
    """Why a signed site's dilated borders cannot be built at its opset, or None."""
    params = pool.params
    for axis, n in enumerate(pool.spatial):
        if params.dilation[axis] > 1 and pool.pads_end[axis] and n is None and pool.opset < NEGATIVE_INDICES:
            return (f"signed input, dilation {params.dilation[axis]} and a dynamic size along spatial axis {axis}: "
                    f"copying its last elements needs Gather's negative indices (opset {NEGATIVE_INDICES}), the "
                    f"model imports opset {pool.opset}; fix the input size or convert the model's opset")
    return None


def copy_borders(edit: GraphEditor, source: ir.Value, pool: PoolSite, base: str) -> tuple[ir.Value, str]:
    """``source`` padded by ``pool``'s pads (ceil_mode's windows included)
    with copies of valid taps, and a sentence on how."""
    params = pool.params
    begin, end = pool.pads_begin, pool.pads_end
    edge = [a for a in range(params.dims) if params.dilation[a] == 1 and (begin[a] or end[a])]
    dilated = [a for a in range(params.dims) if params.dilation[a] > 1 and (begin[a] or end[a])]
    z = source
    if edge:
        pads = [0, 0, *(begin[a] if a in edge else 0 for a in range(params.dims)),
                0, 0, *(end[a] if a in edge else 0 for a in range(params.dims))]
        z = _pad_edge(edit, z, pads, pool.opset, f"{base}/pad")
    for axis in dilated:
        z = _repeat_residues(edit, z, pool, axis, f"{base}/pad_axis{axis}")
    how = []
    if edge:
        how.append("edge replication")
    if dilated:
        how.append("the first/last d elements repeated along dilated axes")
    return z, f"{COPIES} ({'; '.join(how)})"


def _pad_edge(edit: GraphEditor, z: ir.Value, pads: list[int], opset: int, name: str) -> ir.Value:
    if opset >= PADS_AS_INPUT:
        node = edit.node("Pad", [z, edit.initializer(f"{name}.pads", np.array(pads, np.int64))], {"mode": "edge"},
                         name)
    else:
        node = edit.node("Pad", [z], {"mode": "edge", ("pads" if opset >= 2 else "paddings"): pads}, name)
    return node.outputs[0]


def _repeat_residues(edit: GraphEditor, z: ir.Value, pool: PoolSite, axis: int, name: str) -> ir.Value:
    d, n = pool.params.dilation[axis], pool.spatial[axis]
    before, after = pool.pads_begin[axis], pool.pads_end[axis]
    left = [(-j) % d for j in range(before, 0, -1)]
    right = [j - 1 - d * math.ceil(j / d) for j in range(1, after + 1)]  # from the end
    if n is not None:  # plain indices; below d elements only windows of padding read these copies
        left = [min(i, n - 1) for i in left]
        right = [max(n + i, 0) for i in right]
    parts = []
    for side, indices in (("before", left), (None, None), ("after", right)):
        if side is None:
            parts.append(z)
        elif indices:
            index = edit.initializer(f"{name}_{side}.indices", np.array(indices, np.int64))
            parts.append(edit.node("Gather", [z, index], {"axis": 2 + axis}, f"{name}_{side}").outputs[0])
    return edit.node("Concat", parts, {"axis": 2 + axis}, name).outputs[0]
