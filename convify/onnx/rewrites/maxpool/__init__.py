"""Max pooling becomes convolution, in ONNX graphs: the core's
``maxpool`` rewrite (:data:`convify.core.rewrites.maxpool.SPEC`) on
``MaxPool`` nodes of every opset.

This file finds the sites and decides replace-or-skip; the window is read
in :mod:`.window`; what a site becomes is its pooling mode's, one file each,
registered with :func:`~.modes.onnx_pool_mode`:

* :mod:`.strided`: ``conv`` (one ``Conv``, ``C -> C``) and ``depthwise`` (``group=C``);
* :mod:`.exact`: convolutions and ReLUs (and additions, in the chain form)
  that compute the max pooling exactly, its signed borders in :mod:`.borders`.

``fold`` (moving the stride onto the convolution before) is not done on
ONNX graphs: asking for it is a :class:`~convify.errors.UsageError` that
names the modes there are.

A site is skipped, with the reason in the report, when its Indices output
is used, its input is not floating point or has no static channel count,
a window holds padding only, ``auto_pad=SAME_*`` meets a dynamic size or a
dilation, or it sits in a subgraph or a function (the main graph's
poolings are rewritten).
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Sequence

import onnx_ir as ir

from convify.core.report import Replaced
from convify.core.rewrites.maxpool import SPEC, MaxPoolOptions
from convify.onnx.building import GraphEditor
from convify.onnx.nonnegative import nonnegative_proof
from convify.onnx.rewrites import implements
from convify.onnx.rewrites.base import OnnxRewrite, Site
from convify.onnx.rewrites.maxpool.modes import OnnxPoolMode, pool_mode_for
from convify.onnx.rewrites.maxpool.window import PoolSite, indices_reason, read_pool
from convify.onnx.values import ShapeTable, label

#: The op type this rewrite replaces, in the ONNX domain.
OP_TYPE = "MaxPool"


def _is_max_pool(node: ir.Node) -> bool:
    return node.op_type == OP_TYPE and node.domain in ("", "ai.onnx")


@implements(SPEC)
class ReplaceMaxPool(OnnxRewrite[PoolSite]):
    """``MaxPool`` nodes become what their mode makes of them; see :class:`MaxPoolOptions`."""

    options: MaxPoolOptions

    def __init__(self, options: MaxPoolOptions | None = None, **values: Any) -> None:
        super().__init__(options, **values)
        self.mode: OnnxPoolMode = pool_mode_for(self.options.mode)

    def find_sites(self, model: ir.Model, shapes: ShapeTable) -> list[Site[PoolSite]]:
        sites = [self._site(node, shapes) for node in model.graph if _is_max_pool(node)]
        for site in sites:  # every proof on the graph as it was: a rewritten site is no max pooling to walk through
            if site.skip_reason is None:
                site.params = site.params.with_proof(nonnegative_proof(site.node.inputs[0]))
                site.skip_reason = self.mode.skip_reason(site, self.options)
        return sites + _nested_sites(model)

    def _site(self, node: ir.Node, shapes: ShapeTable) -> Site[PoolSite]:
        inp, out = shapes.of(node.inputs[0]), shapes.of(node.outputs[0])
        site = Site(label(node), node, OP_TYPE, in_shape=inp.static, out_shape=out.static)
        reason = indices_reason(node)
        if reason is None:
            pool, reason, site.skip_cause = read_pool(node, shapes)
            if pool is not None:
                site.params, site.op = pool, pool.describe()
        site.skip_reason = reason
        return site

    def apply(self, edit: GraphEditor, site: Site[PoolSite]) -> Replaced:
        return self.mode.apply(edit, site, self.options)

    def nothing_found(self) -> str:
        return "no MaxPool node found in the graph: nothing to rewrite"

    def finish(self, rows: Sequence[Replaced]) -> list[str]:
        notes = self.mode.finish(rows, self.options)
        return notes + [NOT_EXACT] if any(not r.exact for r in rows) else notes


def _nested_sites(model: ir.Model) -> list[Site[PoolSite]]:
    """MaxPool nodes in subgraphs (If, Loop, Scan bodies) and functions, skipped with the reason."""
    sites = []
    for node in model.graph.all_nodes():
        if _is_max_pool(node) and node.graph is not model.graph:
            where = node.graph.name if node.graph is not None else "?"
            sites.append(Site(label(node), node, OP_TYPE, skip_reason=(
                f"inside the subgraph {where!r} of a control-flow node; convify rewrites the main graph's "
                "max poolings only")))
    for function in model.functions.values():
        for node in function:
            if _is_max_pool(node):
                sites.append(Site(f"{function.name}:{label(node)}", node, OP_TYPE, skip_reason=(
                    f"inside the function {function.domain}:{function.name}; convify rewrites the main graph's "
                    "max poolings only (inline the function first)")))
    return sites


#: The pass note of a rewrite that changed what the model computes: what to do about it.
NOT_EXACT = ("not exact: these sites no longer compute a max pooling, so a trained model's outputs change; "
             "mode='exact' keeps its function (convolutions, ReLUs and additions) and needs no data")


for _info in pkgutil.iter_modules(__path__):  # every mode file registers itself
    importlib.import_module(f"{__name__}.{_info.name}")
