"""Whether a rebuilt head computes what the Linear head did, and if not, what
its output is instead."""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from convify.core.rewrites.head import Exactness, HeadFacts, judge_head
from convify.fx import ops
from convify.fx.rewrites.head.matching import Head, shape
from convify.fx.rewrites.head.plan import HeadPlan


def judge(gm: fx.GraphModule, head: Head, plan: HeadPlan) -> tuple[Exactness, str | None]:
    """How the head rebuilt by ``plan`` relates to the original, and a note
    saying why when it is not exact: the core's verdict (:func:`judge_head`)
    on what this graph shows."""
    exactness, why = judge_head(HeadFacts(
        plan.mode, plan.dense, plan.collapsed, plan.removal,
        reads_point=all(s == 1 for s in head.spatial),
        source_is_point=head.pool is not None and all(s == 1 for s in shape(head.pool.source)[2:]),
        affine_front=all(ops.elementwise_kind(gm, n) is ops.Elementwise.AFFINE for n in head.between + head.pre_ops),
        affine_tail=_affine_tail(gm, head)))
    if plan.collapsed and why is not None:
        why += "; calibration= fits it toward the original logits"
    return exactness, why


def _affine_tail(gm: fx.GraphModule, head: Head) -> bool:
    return all(n in head.linears or ops.elementwise_kind(gm, n) is ops.Elementwise.AFFINE
               or _is_eval_batchnorm(gm, n) for n in head.tree)


def _is_eval_batchnorm(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "call_module":
        return False
    module = gm.get_submodule(node.target)
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.training
