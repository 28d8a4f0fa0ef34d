"""Carrying out a :class:`~.plan.HeadPlan` on an ONNX graph: the new ``Conv``
nodes and the surgery that puts them where the head's layers were.

* Each layer (a ``Gemm``, a ``MatMul`` and its bias ``Add``) becomes one
  ``Conv`` named after it (``<layer>/conv``, its weight and bias
  ``<layer>/conv.weight`` and ``.bias``), inserted where the layer was: the
  first on the plan's map with the plan's kernel (its weight the layer's,
  reshaped by :func:`convify.core.weights.linear_to_conv_weight`, permuted
  from channels last behind tf2onnx's Transpose), the others 1x1.
* The per-position nodes between the layers (``Relu``, ``Dropout``,
  ``BatchNormalization``, ...) stay as they are, names and attributes
  included: they read the maps now (their declared shapes are cleared).
* Whatever outside the head read one of its values reads it flattened
  (``Flatten(axis=1)``, ``<layer>/flatten``), as before; a graph output keeps
  its name, type and shape, so the file is a drop-in. With ``dense`` a graph
  output is the map itself.
* The nodes nothing reads any more (the layers, the flatten and what computed
  its shape, a removed pooling, the weights' ``Constant`` and ``Identity``
  nodes) go, and so do the initializers only they read.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import torch

from convify.core import weights as W
from convify.core.rewrites.head import PoolRemoval
from convify.onnx.building import IR_VERSION_INITIALIZERS_APART, GraphEditor
from convify.onnx.rewrites.head.matching import Head, Step
from convify.onnx.rewrites.head.plan import HeadPlan
from convify.onnx.rewrites.head.reading import Linear, batchnorm_affine, is_batchnorm
from convify.onnx.values import attribute, label, opset_of_node


@dataclass
class Rebuilt:
    """What :func:`rebuild` did: the new convolutions, the nodes removed, the
    values that left the head as maps (``dense``: graph outputs) with their
    channel counts, notes."""

    convs: list[ir.Node] = field(default_factory=list)
    removed: list[ir.Node] = field(default_factory=list)
    map_outputs: list[tuple[ir.Value, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def rebuild(edit: GraphEditor, head: Head, plan: HeadPlan) -> Rebuilt:
    """Replace the head's layers by convolutions on the map ``plan`` chose, in place."""
    done = Rebuilt()
    first_added = len(edit.added)
    env: dict[ir.Value, ir.Value] = {}
    handed: list[ir.Value] = []  # the head's values whose readers outside it must be handed the new ones
    cur = _base_map(edit, head, plan)
    for op in head.pre_ops:  # per-position ops on the flattened vector: on the map now, in place
        op.replace_input_with(0, cur)
        cur = op.outputs[0]
        _clear_shapes(op)
        handed.append(cur)
        env[cur] = cur
    env[head.first.input] = cur
    if plan.collapsed:
        _rebuild_collapsed(edit, head, plan, env, handed, done)
    else:
        _rebuild_tree(edit, head, plan, env, handed, done, head.tree)
    if plan.dense:
        for op in head.class_ops:
            if op.inputs[0] in env:
                env[op.outputs[0]] = _class_op_on_map(edit, op, env[op.inputs[0]], head.dims)
                handed.append(op.outputs[0])
    inside = set(head.pre_ops) | set(head.class_ops if plan.dense else ()) | {
        n for step in head.tree for n in (step.nodes if isinstance(step, Linear) else (step,))} | set(
        edit.added[first_added:])
    kept_flatten: list[str] = []
    leaving = [v for old in handed for v in _hand_over(edit, old, env[old], inside, plan.dense, kept_flatten)]
    done.map_outputs = [(value, _channels(value, head, plan, done)) for value in leaving]
    if kept_flatten:
        done.notes.append(f"dense: kept a flatten before {', '.join(sorted(set(kept_flatten)))} (only what goes "
                          "straight to a graph output becomes a score map)")
    gone = [n for step in head.tree for n in (step.nodes if isinstance(step, Linear) else (step,))]
    gone += [*head.reshapes, head.flatten, *(head.between if plan.removal is not PoolRemoval.NONE else ())]
    gone += [n for n in (head.transpose,) if n is not None] + list(head.class_ops if plan.dense else ())
    if plan.removal is not PoolRemoval.NONE or head.map_value is None:
        gone.append(head.pool.node)
    done.removed = sweep(edit, gone)
    return done


# --------------------------------------------------------------------------- the map the head reads


def _base_map(edit: GraphEditor, head: Head, plan: HeadPlan) -> ir.Value:
    """The value the first convolution (or the first per-position op) reads,
    with the nodes that make it inserted before the flatten."""
    if plan.removal is not PoolRemoval.NONE:  # the pooling goes: its per-position ops read its input
        cur = plan.source
        for op in head.between:
            copy = edit.node(op.op_type, [cur, *op.inputs[1:]], _attributes(op), f"{label(op)}/map")
            edit.graph.insert_before(head.flatten, [copy])
            cur = copy.outputs[0]
        return cur
    if head.map_value is None:  # a reduction that flattens stays, keeping its dims
        node = head.pool.node
        attributes = {**_attributes(node), "keepdims": 1}
        copy = edit.node(node.op_type, list(node.inputs), attributes, f"{label(node)}/keepdims")
        edit.graph.insert_before(node, [copy])
        return copy.outputs[0]
    return plan.source


def _attributes(node: ir.Node) -> dict:
    return {name: attribute(node, name) for name in node.attributes}


# --------------------------------------------------------------------------- the layers


def _rebuild_tree(edit: GraphEditor, head: Head, plan: HeadPlan, env: dict[ir.Value, ir.Value],
                  handed: list[ir.Value], done: Rebuilt, steps: tuple[Step, ...]) -> None:
    for step in steps:
        if not isinstance(step, Linear):
            step.replace_input_with(0, env[step.inputs[0]])
            _clear_shapes(step)
            env[step.outputs[0]] = step.outputs[0]
            handed.append(step.outputs[0])
            continue
        first = step is head.first
        if first:
            weight, kernel = _first_weight(head, plan)
        else:
            weight, kernel = W.linear_to_pointwise_weight(step.weight, head.dims), (1,) * head.dims
        out = _conv(edit, step, env[step.input], weight, step.bias, kernel, done)
        if first and plan.mode.averages and not plan.dense:
            out = _global_average(edit, step, out)
        env[step.output] = out
        handed.append(step.output)


def _first_weight(head: Head, plan: HeadPlan) -> tuple[torch.Tensor | np.ndarray, tuple[int, ...]]:
    """The first convolution's weight and kernel. A reshape stays a numpy view
    of the layer's weight, which may lie in the file read (written by a copy,
    never loaded: :func:`convify.onnx.files.file_range`)."""
    weight = head.channel_major_weight()
    if plan.mode.averages:  # a sum over the positions: in float64, like every weight that is computed
        return W.linear_to_gap_weight(_float64(weight), head.channels, head.spatial), (1,) * head.dims
    return W.linear_to_conv_weight(weight, head.channels, plan.kernel), plan.kernel


def _rebuild_collapsed(edit: GraphEditor, head: Head, plan: HeadPlan, env: dict[ir.Value, ir.Value],
                       handed: list[ir.Value], done: Rebuilt) -> None:
    """The paper's GAP head (the tree is a chain, :func:`~.plan.chain_break`):
    one 1x1 convolution to the classes under the first layer's name, global
    average pooling, then the steps after the last layer; the hidden steps go."""
    last = head.linears[-1]
    cut = head.tree.index(last)
    weight, bias = W.flattened_head_to_gap(head_steps(head), head.channels, head.spatial)
    out = _conv(edit, head.first, env[head.first.input], weight, bias.numpy(), (1,) * head.dims, done,
                before=last)
    if not plan.dense:
        out = _global_average(edit, head.first, out, after=out.producer())
    env[last.output] = out
    handed.append(last.output)
    _rebuild_tree(edit, head, plan, env, handed, done, head.tree[cut + 1:])


def head_steps(head: Head) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The head from its first to its last layer as affine steps
    (:func:`convify.core.weights.compose_affine`): each layer's weight and
    bias (the first's channel-major), a BatchNormalization's scale and shift;
    Identity and Dropout are identities, and so, for this initialization, are the activations."""
    steps: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    last = head.tree.index(head.linears[-1])
    for step in head.tree[:last + 1]:
        if isinstance(step, Linear):
            weight = head.channel_major_weight() if step is head.first else step.weight
            steps.append((_float64(weight),  # summed over positions before compose_affine
                          None if step.bias is None else torch.tensor(step.bias)))
        elif is_batchnorm(step):
            scale, shift = batchnorm_affine(step)
            steps.append((torch.tensor(scale), torch.tensor(shift)))
    return steps


def _float64(array: np.ndarray) -> torch.Tensor:
    """A float64 copy of a weight as torch (the weight itself may be a read-only view of the file)."""
    return torch.tensor(array, dtype=torch.float64)


def _conv(edit: GraphEditor, linear: Linear, source: ir.Value, weight: torch.Tensor | np.ndarray,
          bias: np.ndarray | None,
          kernel: tuple[int, ...], done: Rebuilt, before: Linear | None = None) -> ir.Value:
    """A Conv computing ``linear`` (with ``weight``, ``bias``) on ``source``, inserted before the layer."""
    base = f"{linear.name}/conv"
    dtype = linear.numpy_dtype
    array = weight.numpy() if isinstance(weight, torch.Tensor) else weight
    inputs = [source, edit.initializer(f"{base}.weight", array.astype(dtype, copy=False))]
    if bias is not None:
        inputs.append(edit.initializer(f"{base}.bias", np.asarray(bias).astype(dtype)))
    conv = edit.node("Conv", inputs, {"kernel_shape": list(kernel)}, base)
    edit.graph.insert_before((before or linear).node, [conv])
    done.convs.append(conv)
    return conv.outputs[0]


def _global_average(edit: GraphEditor, linear: Linear, value: ir.Value, after: ir.Node | None = None) -> ir.Value:
    pool = edit.node("GlobalAveragePool", [value], None, f"{linear.name}/gap")
    edit.graph.insert_after(after or value.producer(), [pool])
    return pool.outputs[0]


def _clear_shapes(node: ir.Node) -> None:
    """A node kept in place reads a map now: its outputs' declared shapes (a
    vector's) no longer hold (a graph output's goes to the flattened value
    that takes its place: :func:`_hand_over`)."""
    for out in node.outputs:
        if out is not None and not out.is_graph_output():
            out.shape = None


# --------------------------------------------------------------------------- the head's output


def _class_op_on_map(edit: GraphEditor, op: ir.Node, value: ir.Value, dims: int) -> ir.Value:
    """A Softmax or LogSoftmax over the classes of the ``(N, K, *S)`` map:
    ``axis=1`` from opset 13, where it normalizes one axis; before 13 it
    flattens the axes from ``axis`` on, so the classes are moved last and back."""
    base = f"{label(op)}/map"
    if opset_of_node(op) >= 13:
        new = [edit.node(op.op_type, [value], {"axis": 1}, base)]
    else:
        last = [0, *range(2, dims + 2), 1]
        back = [0, dims + 1, *range(1, dims + 1)]
        to_last = edit.node("Transpose", [value], {"perm": last}, f"{base}/classes_last")
        normalize = edit.node(op.op_type, [to_last.outputs[0]], {"axis": dims + 1}, base)
        new = [to_last, normalize, edit.node("Transpose", [normalize.outputs[0]], {"perm": back}, f"{base}/back")]
    edit.graph.insert_before(op, new)
    return new[-1].outputs[0]


def _hand_over(edit: GraphEditor, old: ir.Value, new: ir.Value, inside: set[ir.Node], dense: bool,
               kept_flatten: list[str]) -> list[ir.Value]:
    """Readers of the head's value ``old`` outside the head read ``new``
    (its map) flattened; a graph output ``old`` was becomes the flattened
    value under its name, or (``dense``) the map, which is returned."""
    graph = edit.graph
    outside = [(n, i) for n, i in old.uses() if n not in inside]
    positions = [k for k, v in enumerate(graph.outputs) if v is old]
    if not outside and not positions:
        return []
    flat = None
    if outside or not dense:
        producer = new.producer()
        flat = edit.node("Flatten", [new], {"axis": 1}, f"{label(producer)}/flatten")
        graph.insert_after(producer, [flat])
        for user, index in outside:
            user.replace_input_with(index, flat.outputs[0])
        if dense:
            kept_flatten += [label(user) for user, _ in outside]
    if not positions:
        return []
    target = new if dense else flat.outputs[0]
    if target is not old:
        name, type_, shape = old.name, old.type, old.shape
        old.name, old.shape = edit.value_name(f"{name}/vector"), None
        target.name, target.type, target.shape = name, type_, shape
        for k in positions:
            graph.outputs[k] = target
    return [target] if dense else []


def _channels(value: ir.Value, head: Head, plan: HeadPlan, done: Rebuilt) -> int:
    """The channels of one of the new head's maps: its convolution's outputs,
    found back through the per-position ops (the map's own before the first)."""
    convs = {conv.outputs[0]: conv for conv in done.convs}
    while value in convs or value.producer() is not None:
        if value in convs:
            return convs[value].inputs[1].const_value.shape[0]
        if value is plan.source:
            break
        value = value.producer().inputs[0]
    return head.channels


# --------------------------------------------------------------------------- what nothing reads any more


def sweep(edit: GraphEditor, candidates: list[ir.Node]) -> list[ir.Node]:
    """Remove ``candidates`` that nothing reads, then whatever only they read
    (nodes and initializers), to the end; returns the nodes removed in order."""
    graph = edit.graph
    pending = list(dict.fromkeys(candidates))
    removed: list[ir.Node] = []
    progress = True
    while progress:
        progress = False
        for node in list(pending):
            if node.graph is not graph:
                pending.remove(node)
                continue
            if any(out is not None and (out.uses() or out.is_graph_output()) for out in node.outputs):
                continue
            inputs = [v for v in node.inputs if v is not None]
            graph.remove(node, safe=True)
            pending.remove(node)
            removed.append(node)
            progress = True
            for value in inputs:
                producer = value.producer()
                if producer is not None:
                    if producer not in pending:
                        pending.append(producer)
                elif value.is_initializer():
                    _drop_initializer(edit, value)
    return removed


def _drop_initializer(edit: GraphEditor, value: ir.Value) -> None:
    """An initializer nothing reads any more goes; in IR 3, its graph input
    too (it is one there only because IR 3 wants it); in later IRs one that is
    a graph input, a default a caller may replace, stays."""
    if value.uses() or value.is_graph_output():
        return
    graph = edit.graph
    legacy = (edit.model.ir_version or IR_VERSION_INITIALIZERS_APART) < IR_VERSION_INITIALIZERS_APART
    if value.is_graph_input():
        if not legacy:
            return
        graph.inputs.remove(value)
    graph.initializers.pop(value.name)

