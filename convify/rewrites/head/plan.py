"""Deciding how one head is rebuilt, before the graph is touched.

A :class:`HeadPlan` says which map the first convolution reads, its kernel,
whether the pooling in front of the head goes (:class:`PoolRemoval`) and why
it stays when it had better go. :mod:`.building` carries it out and
:mod:`.exactness` judges it; both read the plan, neither decides again.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch.fx as fx

from .matching import Head, PoolKind, shape


class HeadMode(enum.Enum):
    """What the first Linear becomes (``HeadOptions.mode``)."""

    CONV = "conv"    # ConvNd(C, K, kernel=S_P): exact at the traced size
    GAP = "gap"      # a 1x1 convolution, then global average pooling


class PoolRemoval(enum.Enum):
    """What became of the pooling in front of a head."""

    NONE = "none"            # no pooling, or it stays in front of the head
    GLOBAL = "global"        # a global average pooling was removed: the head runs at every position
    IDENTITY = "identity"    # an adaptive average pooling that is an identity at the traced size was removed


@dataclass(frozen=True)
class HeadPlan:
    """How one head is rebuilt.

    ``source`` is the node of the original graph whose map the new head
    reads: the flattened map itself, or (when the pooling is removed, or the
    flatten was a spatial reduction) the pooling's input; the per-position ops
    between pooling and flatten are replayed on it. ``kernel`` is the first
    convolution's kernel. ``note`` says why a pooling stays where
    ``dense``/``gap`` wanted it gone.
    """

    mode: HeadMode
    dense: bool
    source: fx.Node
    kernel: tuple[int, ...]
    removal: PoolRemoval
    note: str | None = None


def plan_head(head: Head, mode: HeadMode, dense: bool) -> HeadPlan:
    """The plan for ``head`` in ``mode``; ``dense`` also removes what pins the
    spatial size (a global average pooling, an adaptive one that is an identity)."""
    pool = head.pool
    want_free = dense or mode is HeadMode.GAP  # the pool should not pin the size
    if head.map_node is None:  # a reduction over the spatial dims, fused with the flatten
        if want_free and pool.kind is PoolKind.AVG:
            return HeadPlan(mode, dense, pool.source, head.spatial, PoolRemoval.GLOBAL)
        note = f"{pool.desc} is no average: kept before the head" if want_free else None
        return HeadPlan(mode, dense, pool.source, head.spatial, PoolRemoval.NONE, note)
    if pool is None or not want_free:
        return HeadPlan(mode, dense, head.map_node, head.spatial, PoolRemoval.NONE)
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
