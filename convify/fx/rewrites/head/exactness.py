"""Whether a rebuilt head computes what the Linear head did, and if not, what
its output is instead."""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from convify.core.rewrites.head import Exactness, HeadMode, PoolRemoval
from convify.fx import ops
from convify.fx.rewrites.head.matching import Head, shape
from convify.fx.rewrites.head.plan import HeadPlan


def judge(gm: fx.GraphModule, head: Head, plan: HeadPlan) -> tuple[Exactness, str | None]:
    """How the head rebuilt by ``plan`` relates to the original, and a note
    saying why when it is not exact."""
    affine_front = all(ops.elementwise_kind(gm, n) is ops.Elementwise.AFFINE for n in head.between + head.pre_ops)
    removed_global = plan.removal is PoolRemoval.GLOBAL
    point_map = not removed_global or all(s == 1 for s in shape(head.pool.source)[2:])
    if plan.mode is HeadMode.CONV and (not plan.dense or point_map):
        return Exactness.EXACT, None
    if plan.collapsed:
        return Exactness.APPROXIMATE, (
            "not exact: the paper's GAP head replaces the MLP (one 1x1 convolution to the classes, global "
            "average pooling; the hidden layers are gone); initialized with the product of the head's weight "
            "matrices summed over the positions (exact on spatially constant maps when the activations between "
            "the Linear layers are identities); calibration= fits it toward the original logits")
    if plan.mode.averages and not removed_global:
        if all(s == 1 for s in head.spatial):
            return Exactness.EXACT, None
        return Exactness.APPROXIMATE, (
            f"{plan.mode.value}: the Linear read a flattened map, so a global-average head cannot be exact; "
            "initialized with its weights summed over the positions (exact on spatially constant maps)")
    if plan.mode.averages and not plan.dense:
        if affine_front:
            return Exactness.EXACT, None
        return Exactness.APPROXIMATE, ("gap: the ops between the pooling and the Linear are not affine (a "
                                       "LayerNorm, an activation): averaging after them differs")
    if point_map:
        return Exactness.EXACT, None
    if affine_front and _affine_tail(gm, head):
        return Exactness.SCORE_MAP_MEAN, (
            "dense: the output is a score map; the head after the pooling is affine, so its mean over the "
            "positions equals the original output at any input size")
    return Exactness.PER_POSITION, (
        "dense: the output is a per-position classifier (the head after the pooling is not affine: a "
        "non-linear MLP or a LayerNorm); its mean over the positions is not the original output")


def _affine_tail(gm: fx.GraphModule, head: Head) -> bool:
    return all(n in head.linears or ops.elementwise_kind(gm, n) is ops.Elementwise.AFFINE
               or _is_eval_batchnorm(gm, n) for n in head.tree)


def _is_eval_batchnorm(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "call_module":
        return False
    module = gm.get_submodule(node.target)
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.training
