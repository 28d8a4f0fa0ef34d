"""``mode="fold"``: the Strided-CNN variant. The pool is dropped and its
stride moves onto the stride-1 convolution that produces its input (through
elementwise and per-channel ops only); where that cannot be done the site
becomes ``conv``'s strided convolution, and its row says why."""
from __future__ import annotations

from typing import Sequence

import torch.fx as fx
import torch.nn as nn

from convify.core import weights as W
from convify.core.report import Replaced
from convify.core.rewrites.maxpool import CONV, FOLD, SPEC, MaxPoolOptions, PoolParams, PoolRecord, fmt
from convify.fx import ops, shapes
from convify.fx.rewrites.base import Site
from convify.fx.rewrites.maxpool.modes import FxPoolMode, pool_mode, site_input
from convify.fx.rewrites.maxpool.strided import strided_conv
from convify.wording import counted

CAVEAT = ("fold keeps the pool's output shape at the example input size and at sizes congruent to it "
          "modulo the network's stride; at other sizes folded shapes may differ (the paper's Strided-CNN "
          "is defined for one input size)")


@pool_mode(FOLD)
class Fold(FxPoolMode):
    def apply(self, gm: fx.GraphModule, site: Site[PoolParams], options: MaxPoolOptions) -> Replaced:
        blocker = _fold_blocker(gm, site)
        if blocker is None:
            return _fold(gm, site)
        return strided_conv(gm, site, options, mode=CONV.name, depthwise=False, fold_blocker=blocker,
                            notes=(f"fold not possible: {blocker}; used mode='conv'",))

    def finish(self, rows: Sequence[Replaced], options: MaxPoolOptions | None = None) -> list[str]:
        return [CAVEAT] if any(r.detail.mode == FOLD.name for r in rows) else []


def _is_elementwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Ops that commute with taking every s-th position: elementwise and per channel."""
    return ops.elementwise_kind(gm, node) is not None or ops.is_per_channel(gm, node)


def _fold_chain(gm: fx.GraphModule, site: Site[PoolParams]) -> tuple[fx.Node | None, str | None]:
    """The producing convolution node, or why there is none."""
    node = site.node
    cur = node.args[0] if node.args else node.kwargs.get("input")
    while isinstance(cur, fx.Node):
        if len(cur.users) != 1:
            return None, f"{cur.name!r} between the convolution and the pool is also used elsewhere"
        if cur.op == "call_module" and isinstance(gm.get_submodule(cur.target), nn.modules.conv._ConvNd):
            return cur, None
        if not _is_elementwise(gm, cur) or not cur.args or not isinstance(cur.args[0], fx.Node):
            return None, f"its input comes from {cur.format_node()}, not from a convolution through elementwise ops"
        cur = cur.args[0]
    return None, "its input is not produced by a convolution"


def _fold_blocker(gm: fx.GraphModule, site: Site[PoolParams]) -> str | None:
    params = site.params
    if params.return_indices:
        return "it returns indices"
    producer, reason = _fold_chain(gm, site)
    if producer is None:
        return reason
    conv = gm.get_submodule(producer.target)
    if len(conv.kernel_size) != params.dims or isinstance(conv, nn.modules.conv._ConvTransposeNd):
        return f"{producer.target} is a {type(conv).__name__}"
    if any(s != 1 for s in conv.stride):
        return f"{producer.target} already has stride {conv.stride}"
    if isinstance(conv.padding, str):
        return f"{producer.target} uses padding={conv.padding!r}"
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and gm.get_submodule(n.target) is conv]
    if len(calls) > 1:
        return f"{producer.target} is called at {counted(len(calls), 'place')}; a stride would change them all"
    conv_in, pool_out = shapes.input_info(producer), shapes.info(site.node)
    if conv_in is None or pool_out is None:
        return "no shapes were recorded"
    folded = tuple(W.conv_output_size(size, k, s, p, d) for size, k, s, p, d in zip(
        conv_in.shape[2:], conv.kernel_size, params.stride, conv.padding, conv.dilation))
    if folded != tuple(pool_out.shape[2:]):
        return f"the strided convolution would give {folded} where the pool gives {tuple(pool_out.shape[2:])}"
    return None


def _now_pool_sized(producer: fx.Node, pool: fx.Node, out: shapes.TensorInfo | None) -> None:
    """After a fold, the convolution and the elementwise ops up to the pool
    output what the pool did (the fold was allowed because the shapes agree):
    say so in their recorded shapes, so that a later fold, or a later site's
    report row, reads the shapes as they are now, not as they were before."""
    cur = pool.args[0] if pool.args else pool.kwargs.get("input")
    while isinstance(cur, fx.Node):
        cur.meta[shapes.META] = out
        if cur is producer:
            return
        cur = cur.args[0]


def _fold(gm: fx.GraphModule, site: Site[PoolParams]) -> Replaced:
    params = site.params
    producer, _ = _fold_chain(gm, site)
    conv = gm.get_submodule(producer.target)
    old_stride = tuple(conv.stride)
    conv.stride = params.stride
    node = site.node
    inp, out = shapes.input_info(node), shapes.info(node)  # read before the node is erased
    _now_pool_sized(producer, node, out)
    node.replace_all_uses_with(site_input(node))
    gm.graph.erase_node(node)
    return Replaced(SPEC.name, site.name, site.op,
                    f"stride {fmt(old_stride)}->{fmt(params.stride)} on {producer.target}",
                    inp.shape if inp else None, out.shape if out else None, exact=False, module=producer.target,
                    detail=PoolRecord(params, FOLD.name))
