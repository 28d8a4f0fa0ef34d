"""Fully connected classifier heads become convolutions, in ONNX graphs: the
core's ``head`` rewrite (:data:`convify.core.rewrites.head.SPEC`) on
``Gemm`` and ``MatMul`` (+ ``Add``) heads, with the torch.fx frontend's
modes and ``dense`` (see :class:`~convify.core.rewrites.head.HeadOptions`).

A site is one ``Gemm``, or ``MatMul`` with a constant 2-d weight, that is
no later layer of a head already found. It is a head when it reads a
flattened feature map (:mod:`.matching`: a ``Flatten``, a ``Reshape`` to a
constant or computed shape, a ``Squeeze``, tf2onnx's Transpose to channels
last before it, a global pooling or ``ReduceMean`` in front) and its result
reaches a graph output without becoming a map again; the layers after it,
with ``Relu``, ``Dropout``, ``Identity``, ``BatchNormalization`` between them,
are part of it. Any other site is skipped with the reason (``not a head:
its input is not a flattened feature map``, a ``transA=1``, a weight that is
no constant, a squeeze-excitation's layer ...).

``mode="conv"``: the first layer becomes a ``Conv`` whose kernel is the map
(a 1x1 after a global pooling, which stays), the others 1x1 convolutions, and
a ``Flatten`` gives the graph output its old name, type and ``(N, K)``
shape: a drop-in file, exact up to float rounding. ``gap``/``gap_mlp``: as
in torch.fx (a ``GlobalAveragePool`` after the first convolution; ``gap``
on a flattened map is the paper's single 1x1 convolution), initializations
that are not exact: the ONNX frontend fits no weights. ``dense=True``
(:mod:`.dense`): the final flatten and a global average pooling go, the
input's spatial axes become symbolic and the output is ``(N, K, h, w)``; a
final ``Softmax`` over the classes moves onto the map's axis 1 (before
opset 13, which would flatten the map, between two Transposes).

Graph before and after (tf2onnx's Keras head, ``mode="conv"``)::

    %t = Transpose[perm=[0, 2, 3, 1]](%p)            # (1, 16, 4, 4) -> (1, 4, 4, 16)
    %f = Reshape(%t, %shape)                         # (1, 256)
    %h = Add(MatMul(%f, %dense/kernel), %dense/bias) ; %r = Relu(%h)
    %y = Add(MatMul(%r, %dense_1/kernel), %dense_1/bias) ; %out = Softmax(%y)

    %c = Conv[kernel_shape=[4, 4]](%p, %dense/MatMul/conv.weight, %dense/MatMul/conv.bias)   # (1, 32, 1, 1)
    %r = Relu(%c)
    %y = Flatten[axis=1](Conv[kernel_shape=[1, 1]](%r, ...)) ; %out = Softmax(%y)

This file declares the rewrite and finds its sites; :mod:`.reading` reads a
layer's weights, :mod:`.matching` a head, :mod:`.plan` decides and judges,
:mod:`.building` rebuilds, :mod:`.dense` frees the sizes.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import onnx_ir as ir

from convify.core.report import Replaced
from convify.core.rewrites.head import SPEC, HeadMode, HeadOptions, HeadRecord, PoolRemoval
from convify.onnx.building import IR_VERSION_INITIALIZERS_APART, GraphEditor
from convify.onnx.rewrites import implements
from convify.onnx.rewrites.base import OnnxRewrite, Site
from convify.onnx.rewrites.head.building import Rebuilt, rebuild
from convify.onnx.rewrites.head.dense import make_dense
from convify.onnx.rewrites.head.matching import Head, feeds_a_map, head_tree, reaches_output, walk_back
from convify.onnx.rewrites.head.plan import HeadPlan, judge, plan_head
from convify.onnx.rewrites.head.reading import Linear, is_linear_candidate, is_standard, read_linear, vector_reason
from convify.onnx.values import ShapeTable, label

NOT_A_HEAD = "not a head: its input is not a flattened feature map"


@implements(SPEC)
class ReplaceLinearHead(OnnxRewrite[Head]):
    """Gemm and MatMul heads become convolutions; see :class:`HeadOptions`."""

    options: HeadOptions

    def find_sites(self, model: ir.Model, shapes: ShapeTable) -> list[Site[Head]]:
        ir_version = model.ir_version or IR_VERSION_INITIALIZERS_APART
        order = {node: i for i, node in enumerate(model.graph)}
        taken: set[ir.Node] = set()
        sites = []
        for node in model.graph:
            if node in taken or not is_linear_candidate(node, ir_version):
                continue
            site = _site(node, shapes, ir_version, order)
            sites.append(site)
            if site.params is not None:
                taken.update(n for linear in site.params.linears for n in linear.nodes)
        return sites + _nested_sites(model, ir_version)

    def apply(self, edit: GraphEditor, site: Site[Head]) -> Replaced:
        head: Head = site.params
        plan = plan_head(head, HeadMode(self.options.mode), self.options.dense)
        exactness, why = judge(head, plan)  # on the head as it was
        first = len(edit.added)
        done = rebuild(edit, head, plan)
        notes = [plan.kept_mlp, plan.note, *done.notes]
        if plan.dense:
            notes += make_dense(edit, head, plan, done.map_outputs)
        names = tuple(linear.name for linear in head.linears)
        kept = names[:1] if plan.collapsed else names
        before = sum(linear.parameters for linear in head.linears)
        after = sum(v.const_value.size for conv in done.convs for v in conv.inputs[1:])
        if plan.collapsed:
            dropped = f"dropped the hidden layers {', '.join(names[1:])}; " if len(names) > 1 else ""
            notes.append(f"gap: {dropped}the head has {after:,} parameters instead of {before:,}")
        notes += [why, *_node_notes(site, done, edit.added[first:])]
        record = HeadRecord(kept, plan.kernel, plan.mode, plan.dense, plan.removal, exactness,
                            collapsed=plan.collapsed, dropped=names[len(kept):], parameters=(before, after))
        return Replaced(SPEC.name, site.name, site.op, _describe_new(done, plan), _in_shape(head, plan),
                        _out_shape(head, plan), exact=exactness.exact, module=label(done.convs[0]),
                        notes=tuple(n for n in notes if n), detail=record)

    def nothing_found(self) -> str:
        return "no Gemm or MatMul node found in the graph: nothing to rewrite"

    def finish(self, rows: Sequence[Replaced]) -> list[str]:
        if any(isinstance(r.detail, HeadRecord) and r.detail.needs_fit for r in rows):
            return ["gap heads are initializations, not the original's function: the ONNX frontend fits no "
                    "weights (rewrite the torch model with calibration=, or train the rewritten one)"]
        return []


def _site(node: ir.Node, shapes: ShapeTable, ir_version: int, order: dict[ir.Node, int]) -> Site[Head]:
    site = Site(label(node), node, node.op_type, in_shape=shapes.of(node.inputs[0]).static,
                out_shape=shapes.of(node.outputs[0]).static)
    found = vector_reason(node, shapes) or walk_back(node, shapes)
    linear = read_linear(node, shapes, ir_version)
    if not isinstance(found, Head):
        site.skip_reason = found or NOT_A_HEAD
        return site
    site.skip_reason = linear if isinstance(linear, str) else _head_reason(linear, found, shapes)
    if site.skip_reason:
        return site
    tree, class_ops = head_tree(linear, shapes, ir_version, order)
    site.params = dataclasses.replace(found, tree=tree, class_ops=class_ops)
    site.op = site.params.describe()
    return site


def _head_reason(linear: Linear, head: Head, shapes: ShapeTable) -> str | None:
    features = head.channels * math.prod(head.spatial)
    if linear.features != features:
        size = "x".join(map(str, (head.channels, *head.spatial)))
        return f"its weight reads {linear.features} features, the flattened {size} map has {features}"
    if feeds_a_map(linear.output, shapes):
        return ("not a head: its result flows back into a feature map (a squeeze-excitation gate, attention); "
                "convify converts classifier heads only")
    if not reaches_output(linear.output):
        return "its result reaches no graph output; convify converts classifier heads only"
    return None


def _nested_sites(model: ir.Model, ir_version: int) -> list[Site[Head]]:
    """Layers in subgraphs (If, Loop, Scan bodies) and functions, skipped with the reason."""
    sites = []
    for node in model.graph.all_nodes():
        if node.graph is not model.graph and is_standard(node, "Gemm", "MatMul"):
            where = node.graph.name if node.graph is not None else "?"
            sites.append(Site(label(node), node, node.op_type, skip_reason=(
                f"inside the subgraph {where!r} of a control-flow node; convify rewrites the main graph's heads only")))
    for function in model.functions.values():
        for node in function:
            if is_standard(node, "Gemm", "MatMul"):
                sites.append(Site(f"{function.name}:{label(node)}", node, node.op_type, skip_reason=(
                    f"inside the function {function.domain}:{function.name}; convify rewrites the main graph's heads "
                    "only (inline the function first)")))
    return sites


def _node_notes(site: Site[Head], done: Rebuilt, added: Sequence[ir.Node]) -> list[str]:
    """The notes that name the ONNX nodes replaced and added, with the initializers added."""
    gone = ", ".join(f"{label(n)} ({n.op_type})" for n in done.removed)
    new = ", ".join(f"{label(n)} ({n.op_type})" for n in added)
    notes = [f"ONNX nodes replaced: {gone}", f"ONNX nodes added: {new}"]
    weights = [v.name for n in added for v in n.inputs[1:] if v is not None and v.is_initializer()]
    if weights:
        notes.append(f"initializers added: {', '.join(weights)}")
    return notes


def _describe_new(done: Rebuilt, plan: HeadPlan) -> str:
    """The row's ``new`` column: ``Conv(512, 1000, k=1x1) -> Flatten``."""
    parts = []
    for k, conv in enumerate(done.convs):
        shape = conv.inputs[1].const_value.shape
        parts.append(f"Conv({shape[1]}, {shape[0]}, k={'x'.join(str(d) for d in shape[2:])})")
        if k == 0 and plan.mode.averages and not plan.dense:
            parts.append("GlobalAveragePool")
    if not plan.dense:
        parts.append("Flatten")
    return " -> ".join(parts)


def _static(dims: Sequence[object]) -> tuple[int, ...] | None:
    return tuple(dims) if all(isinstance(d, int) for d in dims) else None


def _in_shape(head: Head, plan: HeadPlan) -> tuple[int, ...] | None:
    """The static shape of the map the new head reads, at the exported size."""
    spatial = head.pool.source_spatial if plan.source is not head.map_value else head.spatial
    return _static((head.batch, head.channels, *spatial))


def _out_shape(head: Head, plan: HeadPlan) -> tuple[int, ...] | None:
    """The head's output shape at the exported size: ``(N, K)``, or with ``dense`` a score map ``(N, K, *S)``."""
    if not plan.dense:
        return _static((head.batch, head.linears[-1].classes))
    if plan.removal in (PoolRemoval.GLOBAL, PoolRemoval.RESAMPLING):
        size = head.pool.source_spatial
    elif head.map_value is not None:
        size = head.spatial
    else:
        size = (1,) * head.dims
    if plan.mode is HeadMode.CONV:
        size = tuple(None if s is None else s - k + 1 for s, k in zip(size, plan.kernel))
    return _static((head.batch, head.linears[-1].classes, *size))
