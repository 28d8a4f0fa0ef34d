"""The guard of a head that gives the original's output at one map size only.

A Linear on a flattened ``(N, C, H, W)`` map raises for any input whose map
has another number of positions. Its ``conv`` head, an ``HxW`` convolution
and a flatten, would instead slide over a larger map and return a longer
vector, silently. Unless something in front of it fixes the map's size (an
adaptive pooling) or the head averages (``gap``) or is ``dense`` (a score map
is what the user asked for), the rebuilt head is guarded: an input whose map
is not the traced size is refused with a :class:`ExampleInputError` that
names the size, as the guards of :mod:`convify.fx.tracing` do for branches
on shapes.

In a whole pickled model the guard is ``torch._assert`` of the same condition
(:mod:`convify.fx.portable`). In ONNX: ``export_onnx`` keeps the spatial axes
of such a model fixed (the file's input shape refuses other sizes) and
refuses ``dynamic_spatial=True`` for it (:func:`pinned_heads`).
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from convify.errors import ExampleInputError
from convify.fx.rewrites.head.matching import Head, shape
from convify.fx.rewrites.head.plan import HeadPlan
from convify.fx.tracing import guard, plain_assert


def needs_size_guard(head: Head, plan: HeadPlan) -> bool:
    """Whether the rebuilt head gives the original's ``(N, K)`` only at the
    traced map size, with nothing in front of it that fixes that size."""
    return (not plan.dense and not plan.mode.averages and not plan.collapsed and head.map_node is not None
            and head.pool is None)


def add_size_guard(graph: fx.Graph, head: Head, map_node: fx.Node) -> fx.Node:
    """The guard on ``map_node`` (the map the first convolution reads), at the
    graph's insertion point."""
    placeholders = [shape(n) for n in graph.nodes if n.op == "placeholder"]
    traced_input = next((s for s in placeholders if s is not None), None)
    return graph.call_function(check_head_size, (map_node, tuple(head.spatial), head.linears[0].target,
                                                 traced_input))


def _size(dims: Any) -> str:
    return "x".join(str(int(d)) for d in dims)


def _message(site: str, traced: tuple[int, ...], traced_input: tuple[int, ...] | None, got: str) -> str:
    at = f", traced at the input {_size(traced_input)}" if traced_input else ""
    return (f"{site}: this classifier head was rewritten for a {_size(traced)} feature map{at} (the size the "
            f"original's Linear layer was made for) and computes the original's output only there; this input "
            f"gives {got}. Give inputs of the traced size, rewrite with {{input_shape}} of this size, or rewrite "
            "with {dense} for a score map at any size")


def _plain(graph: fx.Graph, node: fx.Node) -> None:
    map_node, traced, site, traced_input = node.args
    size = graph.call_function(operator.getitem, (graph.call_function(getattr, (map_node, "shape")), slice(2, None)))
    same = graph.call_function(operator.eq, (size, tuple(traced)))
    plain_assert(graph, same, ExampleInputError(_message(site, traced, traced_input, "a map of another size")).render())


@guard(_plain)
def check_head_size(feature_map: Any, traced: tuple[int, ...], site: str,
                    traced_input: tuple[int, ...] | None) -> None:
    """Refuse a map of another size than the head was rewritten for."""
    got = tuple(feature_map.shape[2:])
    if got != tuple(traced):
        raise ExampleInputError(_message(site, traced, traced_input, f"a {_size(got)} map"))


def pinned_heads(model: torch.nn.Module) -> list[str]:
    """The heads of ``model`` (in any of its graphs) guarded to one map size."""
    return [str(n.args[2]) for m in model.modules() if isinstance(m, fx.GraphModule)
            for n in m.graph.nodes if n.op == "call_function" and n.target is check_head_size]
