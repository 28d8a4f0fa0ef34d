"""Proving from an ONNX graph that a value is >= 0.

:func:`nonnegative_proof` walks back from a value through ops that keep the
sign (Identity, Dropout, pooling, reshaping, Concat of values that are all
proven, ...) to producers whose output is >= 0 whatever their input (Relu,
Sigmoid, Softplus, Clip with a constant ``min >= 0``, ...) or to constants
that are all >= 0, and returns what it found there (node labels,
comma-separated), or None when the graph does not prove it. The same walk as
:mod:`convify.fx.nonnegative`'s, on ONNX's op types; NaN is taken as no sign.

>>> nonnegative_proof(pool.inputs[0])   # resnet18's maxpool reads a Relu
'/relu/Relu'
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_ir as ir

from convify.onnx.values import attribute, constant_value, label, opset_of_node

#: How far back a proof may walk (a longer chain of sign-keeping ops is taken as unproven).
MAX_STEPS = 256

#: Ops whose output is >= 0 whatever their input.
NONNEGATIVE_OPS = frozenset({"Relu", "Sigmoid", "Softplus", "Softmax", "Exp", "Abs", "HardSigmoid"})

#: Ops whose output is the values of their first input moved, selected or repeated (outputs listed: which keep it).
SIGN_KEEPING_FIRST: dict[str, tuple[int, ...] | None] = {
    **{op: None for op in ("Identity", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Expand", "Tile",
                           "Slice", "Split", "Gather", "DepthToSpace", "SpaceToDepth", "AveragePool",
                           "GlobalAveragePool", "GlobalMaxPool", "ReduceMax", "ReduceMin", "ReduceMean",
                           "ReduceSum")},
    "MaxPool": (0,),  # its values, not its indices
    "Dropout": (0,),  # its output, not its mask
}

#: Ops that are >= 0 when all their inputs are.
SIGN_KEEPING_ALL = frozenset({"Concat", "Add", "Mul", "Sum", "Mean", "Min"})

#: Ops that are >= 0 when any one of their inputs is.
SIGN_KEEPING_ANY = frozenset({"Max"})


def nonnegative_proof(value: ir.Value | None) -> str | None:
    """What makes ``value`` >= 0 (the labels of the producers or constants
    found, comma-separated), or None when the graph does not prove it."""
    found: list[str] = []
    if not _proven(value, found, {}):
        return None
    return ", ".join(dict.fromkeys(found))


def _proven(value: ir.Value | None, found: list[str], seen: dict[int, bool]) -> bool:
    if value is None or len(seen) > MAX_STEPS:
        return False
    key = id(value)
    if key in seen:
        return seen[key]
    seen[key] = False  # while it is being proven (graphs have no cycles; this only guards the walk)
    constant = constant_value(value)
    if constant is not None:
        proven = _all_nonnegative(constant)
        if proven:
            found.append(f"constant {value.name}")
    else:
        proven = _produced_nonnegative(value, found, seen)
    seen[key] = proven
    return proven


def _all_nonnegative(array: np.ndarray) -> bool:
    if array.dtype.kind in "u b":
        return True
    if array.dtype.kind not in "if":
        return False
    return bool(np.all(array >= 0))  # NaN compares False: no sign


def _produced_nonnegative(value: ir.Value, found: list[str], seen: dict[int, bool]) -> bool:
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return False
    op = node.op_type
    if op in NONNEGATIVE_OPS or (op in _CONDITIONS and _CONDITIONS[op](node)):
        found.append(label(node))
        return True
    if op in SIGN_KEEPING_FIRST:
        outputs = SIGN_KEEPING_FIRST[op]
        return (outputs is None or value.index() in outputs) and _proven(_input(node, 0), found, seen)
    if op in SIGN_KEEPING_ALL:
        inputs = [v for v in node.inputs if v is not None]
        return bool(inputs) and all(_proven(v, found, seen) for v in inputs)
    if op in SIGN_KEEPING_ANY:
        return any(_proven(v, found, seen) for v in node.inputs if v is not None)
    if op in ("Resize", "Upsample"):  # nearest and linear interpolation keep the sign; cubic may overshoot
        return attribute(node, "mode", "nearest") in ("nearest", "linear") and _proven(_input(node, 0), found, seen)
    if op == "Pad":
        return _pad_keeps_sign(node) and _proven(_input(node, 0), found, seen)
    return False


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def _constant_at_least_zero(value: ir.Value | None, absent: bool) -> bool:
    """Whether an optional scalar input is a constant >= 0 (``absent``: what an absent input means)."""
    if value is None:
        return absent
    constant = constant_value(value)
    return constant is not None and constant.size > 0 and _all_nonnegative(constant)


def _clip_min(node: ir.Node) -> bool:
    """Clip with a lower bound >= 0: an attribute before opset 11, an input from 11 on (absent: no bound)."""
    if opset_of_node(node) < 11:
        low = attribute(node, "min", None)
        return low is not None and low >= 0
    return _constant_at_least_zero(_input(node, 1), absent=False)


def _thresholded(node: ir.Node) -> bool:
    return attribute(node, "alpha", 1.0) >= 0  # x where x > alpha, else 0


def _pad_keeps_sign(node: ir.Node) -> bool:
    if attribute(node, "mode", "constant") != "constant":
        return True  # edge, reflect, wrap: copies of the input's own values
    if opset_of_node(node) < 11:
        return attribute(node, "value", 0.0) >= 0
    return _constant_at_least_zero(_input(node, 2), absent=True)


_CONDITIONS: dict[str, Callable[[ir.Node], bool]] = {"Clip": _clip_min, "ThresholdedRelu": _thresholded}
