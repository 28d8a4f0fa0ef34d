"""Carrying out a :class:`~.plan.HeadPlan`: the new convolutions and the graph
surgery that puts them where the head's Linears were.

The convolutions are the standard ``nn.Conv1d/2d/3d`` (``ops.CONV_MODULES``),
each at its Linear's module name, so the rewritten model holds no convify
class; ``convify.matmul_heads`` is the opt-in that runs them as a GEMM on CPU.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from convify.core import weights as W
from convify.fx import copying, nodes, ops
from convify.fx.rewrites.head.matching import (Head, is_feature_layer_norm, is_output_like, reaches_linear, reduce_dims,
                                               shape)
from convify.fx.rewrites.head.plan import HeadMode, HeadPlan, PoolRemoval
from convify.fx.rewrites.head.sizing import add_size_guard, needs_size_guard


def rebuild(gm: fx.GraphModule, head: Head, plan: HeadPlan) -> tuple[str, ...]:
    """Replace the head's Linears (and its BatchNorm1d) by convolutions on the
    map ``plan`` chose, in place; returns notes on where the head stopped."""
    graph = gm.graph
    root = head.linears[0]
    with graph.inserting_before(root):
        cur = _base_map(graph, head, plan)
        guarded = needs_size_guard(head, plan)
        if guarded:
            add_size_guard(graph, head, cur)
        for op in head.pre_ops:
            cur = _replay_on_map(gm, op, cur, head.dims)
        env = (_rebuild_collapsed if plan.collapsed else _rebuild_tree)(gm, head, plan, cur)
        notes = _hand_over_users(gm, head, plan, env)
    if guarded:
        size = "x".join(map(str, head.spatial))
        notes += (f"computes the original's output only on a {size} map, the traced size the Linear layer was "
                  "made for: inputs of other sizes are refused (dense=True gives a score map at any size)",)
    for node in reversed(head.tree):
        graph.erase_node(node)
    return notes


def _replay_on_map(gm: fx.GraphModule, op: fx.Node, source: fx.Node, dims: int) -> fx.Node:
    """An op that read the (N, F) vector, now on the (N, F, *S) map: elementwise
    ops as they are; a LayerNorm over the features as a LayerNorm over the
    channels at every position (channels last, normalize, channels back)."""
    graph = gm.graph
    if not is_feature_layer_norm(gm, op):
        return graph.node_copy(op, lambda n: source if n is op.args[0] else n)
    last = graph.call_method("permute", (source, (0, *range(2, dims + 2), 1)))
    norm = graph.node_copy(op, lambda n: last if n is op.args[0] else n)
    return graph.call_method("permute", (norm, (0, dims + 1, *range(1, dims + 1))))


def _base_map(graph: fx.Graph, head: Head, plan: HeadPlan) -> fx.Node:
    """The node the first convolution reads, inserted where needed."""
    if plan.removal is not PoolRemoval.NONE:  # the pooling goes: replay the per-position ops on its input
        env = {head.pool.node: head.pool.source}
        cur = plan.source
        for node in head.between:
            cur = graph.node_copy(node, lambda n: env.get(n, n))
            env[node] = cur
        return cur
    if head.map_node is None:  # a spatial reduction fused with the flatten: it stays, with keepdim
        op, dims, _ = reduce_dims(head.pool.node)
        return graph.call_method(op, (plan.source, dims), {"keepdim": True})
    return plan.source


def _rebuild_tree(gm: fx.GraphModule, head: Head, plan: HeadPlan, base: fx.Node) -> dict[fx.Node, fx.Node]:
    """New nodes for the head's tree, keyed by the nodes they replace."""
    graph = gm.graph
    root = head.linears[0]
    env: dict[fx.Node, fx.Node] = {}
    for node in head.tree:
        if node.op == "call_module" and node in head.linears:
            first = node is root
            linear: nn.Linear = gm.get_submodule(node.target)
            conv = conv_for(linear, head, plan.kernel if first else None, gap=first and plan.mode.averages)
            new = graph.call_module(node.target, (base if first else env[node.args[0]],))
            nodes.set_submodule(gm, node.target, conv)
            if first and plan.mode.averages and not plan.dense:
                new = graph.call_function(ops.ADAPTIVE_AVG_POOL_FUNCTIONS[head.dims], (new, 1))
        elif node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.BatchNorm1d:
            bn = batchnorm_nd(gm.get_submodule(node.target), head.dims)
            new = graph.call_module(node.target, (env[node.args[0]],))
            nodes.set_submodule(gm, node.target, bn)
        else:
            new = graph.node_copy(node, lambda n: env[n])
        env[node] = new
    return env


def _rebuild_collapsed(gm: fx.GraphModule, head: Head, plan: HeadPlan, base: fx.Node) -> dict[fx.Node, fx.Node]:
    """The paper's GAP head (the tree is a chain, :func:`~.plan.chain_break`):
    one 1x1 convolution to the classes under the first Linear's name, global
    average pooling, then the ops after the last Linear; the hidden layers
    (Linears, their activations, dropouts, BatchNorm1d) are dropped."""
    graph = gm.graph
    root, last = head.linears[0], head.linears[-1]
    conv = collapsed_conv(gm, head)
    new = graph.call_module(root.target, (base,))
    nodes.set_submodule(gm, root.target, conv)
    if not plan.dense:
        new = graph.call_function(ops.ADAPTIVE_AVG_POOL_FUNCTIONS[head.dims], (new, 1))
    env: dict[fx.Node, fx.Node] = {last: new}
    for node in head.tree[head.tree.index(last) + 1:]:  # e.g. a final activation: it reads the classes
        env[node] = graph.node_copy(node, lambda n: env[n])
    return env


def collapsed_conv(gm: fx.GraphModule, head: Head) -> nn.Module:
    """The 1x1 convolution of the paper's GAP head, with the data-free init:
    the product of the head's affine steps (:func:`head_steps`) summed over
    the positions (:func:`convify.core.weights.flattened_head_to_gap`)."""
    first = gm.get_submodule(head.linears[0].target)
    last = gm.get_submodule(head.linears[-1].target)
    weight, bias = W.flattened_head_to_gap(head_steps(gm, head), head.channels, head.spatial)
    conv = nn.utils.skip_init(ops.CONV_MODULES[head.dims], head.channels, last.out_features, (1,) * head.dims,
                              device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    conv.train(first.training)
    return conv


def head_steps(gm: fx.GraphModule, head: Head) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The head's chain from its first to its last Linear as affine steps
    (:func:`convify.core.weights.compose_affine`): each Linear's weight and bias;
    an affine op between them (an eval BatchNorm1d, a constant factor,
    dropout) as its per-feature scale and shift; an activation as the identity."""
    steps: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    like = gm.get_submodule(head.linears[0].target).weight
    last = head.tree.index(head.linears[-1])
    for node in head.tree[:last + 1]:
        if node in head.linears:
            linear: nn.Linear = gm.get_submodule(node.target)
            steps.append((linear.weight, linear.bias))
        elif ops.elementwise_kind(gm, node) is not ops.Elementwise.NONLINEAR:
            steps.append(_per_feature_affine(gm, node, like))
    return steps


def _per_feature_affine(gm: fx.GraphModule, node: fx.Node, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` of an op that acts on each feature alone and affinely,
    read off its outputs (in eval mode) on zeros and ones; ``like``: the
    dtype and device of the head's weights."""
    features = shape(node)[1]
    probe = torch.stack([torch.zeros(features), torch.ones(features)]).to(like)
    with torch.no_grad():
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            with copying.eval_mode(module):
                out = module(probe)
        elif node.op == "call_function":
            out = node.target(probe, *node.args[1:], **node.kwargs)
        else:
            out = getattr(probe, node.target)(*node.args[1:], **node.kwargs)
    return out[1] - out[0], out[0]


def _hand_over_users(gm: fx.GraphModule, head: Head, plan: HeadPlan, env: dict[fx.Node, fx.Node]
                     ) -> tuple[str, ...]:
    """Point every user outside the tree at the new nodes: flattened, so it
    sees the ``(N, K)`` it saw before, except (``dense``) the model outputs."""
    graph = gm.graph
    flats: dict[fx.Node, fx.Node] = {}
    kept_flatten: list[str] = []
    stopped: list[str] = []
    inside = set(head.tree)
    for node in head.tree:
        for user in list(node.users):
            if user in inside:
                continue
            if plan.dense and is_output_like(user):
                user.replace_input_with(node, env[node])
                continue
            if node not in flats:
                flats[node] = graph.call_function(torch.flatten, (env[node], 1))
            if plan.dense:
                kept_flatten.append(user.name)
            if reaches_linear(gm, user):
                stopped.append(user.name)
            user.replace_input_with(node, flats[node])
    notes = []
    if stopped:
        notes.append(f"the head ends at {', '.join(sorted(set(stopped)))} (not elementwise per feature, "
                     "e.g. a LayerNorm); the Linear layers after it stay Linear")
    if kept_flatten:
        notes.append(f"dense: kept the flatten before {', '.join(sorted(set(kept_flatten)))} "
                     "(only what goes straight to the output becomes a score map)")
    return tuple(notes)


def conv_for(linear: nn.Linear, head: Head, kernel: tuple[int, ...] | None, gap: bool) -> nn.Module:
    """The convolution that computes ``linear`` on the head's map: the first
    one with ``kernel`` (or, ``gap``, 1x1 with the weight summed over the
    positions), a later one (``kernel`` None) 1x1 on each position's vector."""
    weight = linear.weight
    dims = head.dims
    if kernel is None:
        new_weight, in_ch, k = W.linear_to_pointwise_weight(weight, dims), linear.in_features, (1,) * dims
    elif gap:
        new_weight, in_ch, k = W.linear_to_gap_weight(weight, head.channels, head.spatial), head.channels, (1,) * dims
    else:
        new_weight, in_ch, k = W.linear_to_conv_weight(weight, head.channels, kernel), head.channels, kernel
    # skip_init: the constructor's random init (of up to 100M weights, VGG's fc6) is overwritten at once
    conv = nn.utils.skip_init(ops.CONV_MODULES[dims], in_ch, linear.out_features, k,
                              bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(new_weight)
        if linear.bias is not None:
            conv.bias.copy_(linear.bias)
    conv.train(linear.training)
    return conv


def batchnorm_nd(bn: nn.BatchNorm1d, dims: int) -> nn.Module:
    """The BatchNorm1d of a head as the BatchNorm{2,3}d that reads its conv's map."""
    cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    ref = bn.running_mean if bn.running_mean is not None else bn.weight
    new = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
              track_running_stats=bn.track_running_stats,
              device=ref.device if ref is not None else None, dtype=ref.dtype if ref is not None else None)
    new.load_state_dict(bn.state_dict())
    new.train(bn.training)
    return new


def describe_new(gm: fx.GraphModule, head: Head, plan: HeadPlan) -> str:
    """The row's ``new`` column: ``Conv2d(512, 1000, k=1) -> flatten``."""
    parts = []
    for k, node in enumerate(head.linears):
        conv = gm.get_submodule(node.target)
        ks = "x".join(map(str, conv.kernel_size))
        parts.append(f"Conv{head.dims}d({conv.in_channels}, {conv.out_channels}, k={ks})")
        if k == 0 and plan.mode.averages and not plan.dense:
            parts.append("GAP")
        if plan.collapsed:
            break  # the head's only convolution
    if not plan.dense:
        parts.append("flatten")
    return " -> ".join(parts)


def out_shape(head: Head, plan: HeadPlan) -> tuple[int, ...] | None:
    """The shape of the head's output at the traced size: the Linear's, or
    with ``dense`` a score map ``(N, K, *S)``."""
    last = shape(head.linears[-1])
    if last is None or not plan.dense:
        return last
    if plan.removal in (PoolRemoval.GLOBAL, PoolRemoval.RESAMPLING):
        size = shape(head.pool.source)[2:]
    elif head.map_node is not None:
        size = head.spatial
    else:
        size = (1,) * head.dims
    if plan.mode is HeadMode.CONV:
        size = tuple(s - k + 1 for s, k in zip(size, plan.kernel))
    return (*last, *size)
