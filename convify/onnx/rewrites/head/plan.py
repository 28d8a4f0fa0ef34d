"""Deciding how one ONNX head is rebuilt, and what the rebuilt head computes,
before the graph is touched: the torch.fx frontend's semantics
(``convify.fx.rewrites.head.plan`` and ``.exactness``) on ONNX's :class:`~.matching.Head`.

A :class:`HeadPlan` says which value the first convolution reads, its
kernel, whether the pooling in front of the head goes (the core's
:class:`~convify.core.rewrites.head.PoolRemoval`) and why it stays when it
had better go; :func:`judge` says how its output relates to the original's
(the core's :class:`~convify.core.rewrites.head.Exactness`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import onnx_ir as ir

from convify.core.rewrites.head import Exactness, HeadFacts, HeadMode, PoolRemoval, judge_head
from convify.onnx.rewrites.head.matching import Head, PoolKind, step_output
from convify.onnx.rewrites.head.reading import IDENTITIES, Linear, is_batchnorm, is_standard


@dataclass(frozen=True)
class HeadPlan:
    """How one head is rebuilt.

    ``source``: the value whose map the new head reads: P itself, or (the
    pooling removed, or a reduction that flattens) the pooling's input; the
    per-position ops between pooling and flatten are copied onto it.
    ``kernel``: the first convolution's. ``note``: why a pooling stays where
    ``dense`` or an averaging mode wanted it gone. ``collapsed``: the paper's
    GAP head, one 1x1 convolution to the classes whose weights come from the
    whole head. ``kept_mlp``: why ``gap`` built ``gap_mlp`` instead.
    """

    mode: HeadMode
    dense: bool
    source: ir.Value
    kernel: tuple[int, ...]
    removal: PoolRemoval
    note: str | None = None
    collapsed: bool = False
    kept_mlp: str | None = None


def plan_head(head: Head, mode: HeadMode, dense: bool) -> HeadPlan:
    """The plan for ``head`` in ``mode``; ``dense`` also removes what pins the
    spatial size (a global average pooling, an average pooling that is an
    identity). ``gap`` on a head that reads a flattened map is the paper's
    head; on a head behind a global average it is ``gap_mlp``, exact there."""
    if mode is HeadMode.GAP and reads_positions(head):
        branching = chain_break(head)
        if branching is None:
            return _collapse(head, dense)
        return dataclasses.replace(plan_head(head, HeadMode.GAP_MLP, dense), kept_mlp=(
            f"gap: {branching}, so its hidden layers cannot be dropped; kept them as 1x1 convolutions behind "
            "the global average, as mode='gap_mlp' does"))
    pool = head.pool
    want_free = dense or mode.averages
    ones = (1,) * head.dims
    if head.map_value is None:  # a reduction that flattens: it goes, or stays with keepdims=1
        if want_free and pool.kind is PoolKind.AVG:
            return HeadPlan(mode, dense, pool.source, ones, PoolRemoval.GLOBAL)
        note = f"{pool.desc} is no average: kept before the head" if want_free else None
        return HeadPlan(mode, dense, pool.source, ones, PoolRemoval.NONE, note)
    if pool is None or not want_free:
        return HeadPlan(mode, dense, head.map_value, head.spatial, PoolRemoval.NONE)
    if pool.kind is not PoolKind.AVG:
        return HeadPlan(mode, dense, head.map_value, head.spatial, PoolRemoval.NONE,
                        f"{pool.desc} is no average: kept before the head")
    if not (pool.is_global or pool.is_identity):
        size = "x".join("?" if s is None else str(s) for s in pool.source_spatial)
        return HeadPlan(mode, dense, head.map_value, head.spatial, PoolRemoval.NONE, (
            f"{pool.desc} averages {size} to {'x'.join(map(str, head.spatial))}, not the whole map: it stays in front "
            "of the head, whose first convolution reads its output (on a larger input both slide)"))
    if pool.is_global and not pool.is_identity:
        return HeadPlan(mode, dense, pool.source, ones, PoolRemoval.GLOBAL)
    return HeadPlan(mode, dense, pool.source, head.spatial, PoolRemoval.IDENTITY)


def reads_positions(head: Head) -> bool:
    """Whether the first layer reads more than one position of a map."""
    return head.map_value is not None and any(s != 1 for s in head.spatial)


def chain_break(head: Head) -> str | None:
    """Why the head's tree is no chain whose last step alone is read outside
    it, or None when it is one."""
    nodes = {n for step in head.tree for n in (step.nodes if isinstance(step, Linear) else (step,))}
    last = head.tree[-1]
    for step in head.tree:
        out = step_output(step)
        users = list(dict.fromkeys(n for n, _ in out.uses()))
        inside = [n for n in users if n in nodes]
        name = step.name if isinstance(step, Linear) else step.name or step.op_type
        if len(inside) > 1:
            return f"the head branches at {name} ({', '.join(n.name or n.op_type for n in inside)})"
        if step is not last and (len(inside) < len(users) or out.is_graph_output()):
            return f"{name}, a hidden layer of the head, is also read outside it"
    return None


def _collapse(head: Head, dense: bool) -> HeadPlan:
    """The paper's GAP head: one 1x1 convolution on the map in front of the
    flatten; an average pooling there goes too (the global average after the
    convolution takes its place)."""
    pool, ones = head.pool, (1,) * head.dims
    if pool is None:
        return HeadPlan(HeadMode.GAP, dense, head.map_value, ones, PoolRemoval.NONE, collapsed=True)
    if pool.kind is not PoolKind.AVG:
        return HeadPlan(HeadMode.GAP, dense, head.map_value, ones, PoolRemoval.NONE,
                        f"{pool.desc} is no average: kept before the head", collapsed=True)
    removal = PoolRemoval.IDENTITY if pool.is_identity else PoolRemoval.RESAMPLING
    return HeadPlan(HeadMode.GAP, dense, pool.source, ones, removal, collapsed=True)


# --------------------------------------------------------------------------- exactness


def judge(head: Head, plan: HeadPlan) -> tuple[Exactness, str | None]:
    """How the head rebuilt by ``plan`` relates to the original, and a note
    saying why when it is not exact: the core's verdict (:func:`judge_head`)
    on what this graph shows."""
    return judge_head(HeadFacts(
        plan.mode, plan.dense, plan.collapsed, plan.removal,
        reads_point=all(s == 1 for s in head.spatial),
        source_is_point=head.pool is not None and all(s == 1 for s in head.pool.source_spatial),
        affine_front=all(is_standard(n, *IDENTITIES) for n in head.between + head.pre_ops),
        affine_tail=all(isinstance(s, Linear) or is_standard(s, *IDENTITIES) or is_batchnorm(s) for s in head.tree),
        class_op=head.class_ops[0].op_type if head.class_ops else None))
