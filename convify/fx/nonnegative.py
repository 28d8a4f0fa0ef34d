"""Proving from a graph that a tensor is >= 0.

:func:`nonnegative_proof` walks back from a node through ops that keep the
sign (dropout, identity, pooling, concatenation of tensors that are all
proven, ...) to producers whose output is >= 0 whatever their input (ReLU,
ReLU6, Hardtanh with ``min_val >= 0``, Sigmoid, Softplus with ``beta > 0``),
and returns the producers it found, or None when it cannot prove it. The op
tables are :mod:`convify.fx.ops`'s (``NONNEGATIVE_*``, ``SIGN_KEEPING_*``).

>>> nonnegative_proof(gm, pool_node.args[0])   # resnet18's maxpool reads relu
'relu'
"""
from __future__ import annotations

import operator
from typing import Any

import torch.fx as fx
import torch.nn as nn

from convify.fx import ops

#: How far back a proof may walk (a longer chain of sign-keeping ops is taken as unproven).
MAX_STEPS = 256


def nonnegative_proof(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The producers that make ``node``'s tensor >= 0 (their node names,
    comma-separated), or None when the graph does not prove it."""
    found: list[str] = []
    seen: dict[fx.Node, bool] = {}
    if not _proven(gm, node, found, seen):
        return None
    return ", ".join(dict.fromkeys(found))


def _proven(gm: fx.GraphModule, node: Any, found: list[str], seen: dict[fx.Node, bool]) -> bool:
    if not isinstance(node, fx.Node) or len(seen) > MAX_STEPS:
        return False
    if node in seen:
        return seen[node]
    seen[node] = False  # while it is being proven (graphs have no cycles; this only guards the walk)
    if _is_nonnegative_producer(gm, node):
        found.append(node.name)
        seen[node] = True
    else:
        seen[node] = all(_proven(gm, source, found, seen) for source in _sign_sources(gm, node) or [None])
    return seen[node]


def _is_nonnegative_producer(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if not isinstance(module, ops.NONNEGATIVE_MODULES):
            return False
        condition = next((c for cls, c in ops.NONNEGATIVE_IF.items() if isinstance(cls, type)
                          and isinstance(module, cls)), ())
        return all(test(getattr(module, name)) for name, _pos, _default, test in condition)
    if node.op == "call_function" and node.target in ops.NONNEGATIVE_FUNCTIONS:
        condition = ops.NONNEGATIVE_IF.get(node.target, ())
        return all(_holds(node, name, pos, default, test) for name, pos, default, test in condition)
    return node.op == "call_method" and node.target in ops.NONNEGATIVE_METHODS


def _holds(node: fx.Node, name: str, position: int, default: float, test: Any) -> bool:
    value = node.kwargs.get(name, node.args[position] if len(node.args) > position else default)
    return isinstance(value, (int, float)) and bool(test(value))


def _sign_sources(gm: fx.GraphModule, node: fx.Node) -> list[Any] | None:
    """The tensors whose signs ``node``'s output keeps (all must be >= 0), or
    None when it is no sign-keeping op."""
    first = node.args[0] if node.args else node.kwargs.get("input")
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return [first] if isinstance(module, ops.SIGN_KEEPING_MODULES) else None
    if node.op == "call_method":
        return [first] if node.target in ops.SIGN_KEEPING_METHODS else None
    if node.op != "call_function":
        return None
    if node.target in ops.CONCAT_FUNCTIONS:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        return list(tensors) if isinstance(tensors, (list, tuple)) and tensors else None
    if node.target is operator.getitem and node.args[1] == 0 and _returns_values_first(gm, first):
        return [first]  # the values of a max pooling that also returns indices
    return [first] if node.target in ops.SIGN_KEEPING_FUNCTIONS else None


def _returns_values_first(gm: fx.GraphModule, node: Any) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in ops.MAX_POOL_FUNCTIONS
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.modules.pooling._MaxPoolNd)
