"""Deciding how one head is rebuilt, before the graph is touched.

A :class:`HeadPlan` says which map the first convolution reads, its kernel,
whether the pooling in front of the head goes (:class:`PoolRemoval`) and why
it stays when it had better go. :mod:`.building` carries it out and
:mod:`.exactness` judges it; both read the plan, neither decides again.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.fx as fx

from convify.core.rewrites.head import HeadMode, PoolRemoval
from convify.fx import shapes
from convify.fx.rewrites.head.matching import Head, PoolKind, shape


@dataclass(frozen=True)
class HeadPlan:
    """How one head is rebuilt.

    ``source`` is the node of the original graph whose map the new head
    reads: the flattened map itself, or (when the pooling is removed, or the
    flatten was a spatial reduction) the pooling's input; the per-position ops
    between pooling and flatten are replayed on it. ``kernel`` is the first
    convolution's kernel. ``note`` says why a pooling stays where
    ``dense``/``gap`` wanted it gone. ``collapsed``: the paper's GAP head,
    one 1x1 convolution to the classes whose weights come from the whole
    head; its hidden layers are dropped. ``kept_mlp`` says why ``gap`` built
    ``gap_mlp`` instead (the head is no chain).
    """

    mode: HeadMode
    dense: bool
    source: fx.Node
    kernel: tuple[int, ...]
    removal: PoolRemoval
    note: str | None = None
    collapsed: bool = False
    kept_mlp: str | None = None


def plan_head(head: Head, mode: HeadMode, dense: bool) -> HeadPlan:
    """The plan for ``head`` in ``mode``; ``dense`` also removes what pins the
    spatial size (a global average pooling, an adaptive one that is an identity).

    ``gap`` on a head that reads a flattened map (VGG, AlexNet, LeNet) is the
    paper's head (:func:`_collapse`); on a head behind a global average it
    is ``gap_mlp``, which is exact there."""
    if mode is HeadMode.GAP and reads_positions(head):
        branching = chain_break(head)
        if branching is None:
            return _collapse(head, dense)
        return dataclasses.replace(plan_head(head, HeadMode.GAP_MLP, dense), kept_mlp=(
            f"gap: {branching}, so its hidden layers cannot be dropped; kept them as 1x1 convolutions behind "
            "the global average, as mode='gap_mlp' does"))
    pool = head.pool
    want_free = dense or mode.averages  # the pool should not pin the size
    if head.map_node is None:  # a reduction over the spatial dims, fused with the flatten
        if want_free and pool.kind is PoolKind.AVG:
            return HeadPlan(mode, dense, pool.source, head.spatial, PoolRemoval.GLOBAL)
        note = f"{pool.desc} is no average: kept before the head" if want_free else None
        return HeadPlan(mode, dense, pool.source, head.spatial, PoolRemoval.NONE, note)
    if pool is None or not want_free:
        note = _reduced_elsewhere_note(head) if dense and pool is None else None
        return HeadPlan(mode, dense, head.map_node, head.spatial, PoolRemoval.NONE, note)
    if pool.kind is not PoolKind.AVG:
        return HeadPlan(mode, dense, head.map_node, head.spatial, PoolRemoval.NONE,
                        f"{pool.desc} is no average: kept before the head")
    if not (pool.is_global or pool.is_identity):
        in_size = "x".join(map(str, shape(pool.source)[2:]))
        out_size = "x".join(map(str, shape(pool.node)[2:]))
        return HeadPlan(mode, dense, head.map_node, head.spatial, PoolRemoval.NONE, (
            f"{pool.desc} resamples {in_size} to {out_size} at the traced size: it stays, so the head "
            "is exact only at this size and pins the output size; trace at the size where it is an "
            "identity (e.g. 224 for VGG/AlexNet) to make it dense"))
    if pool.is_global and not pool.is_identity:
        return HeadPlan(mode, dense, pool.source, (1,) * head.dims, PoolRemoval.GLOBAL)
    return HeadPlan(mode, dense, pool.source, head.spatial, PoolRemoval.IDENTITY)


def reads_positions(head: Head) -> bool:
    """Whether the head's first Linear reads more than one position of a map
    (a flattened map, not a global average)."""
    return head.map_node is not None and any(s != 1 for s in head.spatial)


def chain_break(head: Head) -> str | None:
    """Why the head's tree is no chain ``Linear -> ... -> Linear -> ...`` whose
    last node alone is read outside it (a hidden layer that is also an output,
    two Linears on one hidden layer), or None when it is one."""
    inside = set(head.tree)
    last = head.tree[-1]
    for node in head.tree:
        users = [u for u in node.users if u in inside]
        if len(users) > 1:
            return f"the head branches at {node.name} ({', '.join(u.name for u in users)})"
        if node is not last and len(users) < len(node.users):
            return f"{node.name}, a hidden layer of the head, is also read outside it"
    return None


def _collapse(head: Head, dense: bool) -> HeadPlan:
    """The paper's GAP head: one 1x1 convolution on the map in front of the
    flatten; an average pooling there (adaptive, at any size) goes too, since
    the global average after the convolution takes its place."""
    pool, kernel = head.pool, (1,) * head.dims
    if pool is None:
        return HeadPlan(HeadMode.GAP, dense, head.map_node, kernel, PoolRemoval.NONE, collapsed=True)
    if pool.kind is not PoolKind.AVG:
        return HeadPlan(HeadMode.GAP, dense, head.map_node, kernel, PoolRemoval.NONE,
                        f"{pool.desc} is no average: kept before the head", collapsed=True)
    removal = PoolRemoval.IDENTITY if pool.is_identity else PoolRemoval.RESAMPLING
    return HeadPlan(HeadMode.GAP, dense, pool.source, kernel, removal, collapsed=True)


def _reduced_elsewhere_note(head: Head) -> str | None:
    """dense=True on a map reduced to one value per channel where no rewrite
    sees it (code torch.fx could not trace, a module it does not enter)."""
    if head.map_node is None or any(s != 1 for s in head.spatial):
        return None
    who = shapes.reduced_by(head.map_node)
    if who is None:
        return None
    return (f"dense: the map is reduced to one value per channel before the head by {who}, where no rewrite can "
            "remove it; it stays, so the output is 1x1 at any input size (make that code traceable to get a score "
            "map)")
