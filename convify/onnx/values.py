"""What a rewrite reads off an ONNX graph's values: constants, static
shapes and channel counts, producers and consumers.

Shapes come from ``onnx.shape_inference`` (with data propagation, so that a
``Reshape`` to a constant shape has a static output), run through onnx-ir's
``ShapeInferencePass`` on a *clone* of the model: the pass writes the shape
it infers into every value, which would add ``value_info`` for every
intermediate value to the file written; the clone shares the model's
tensors, so it costs the nodes, not the weights. onnx-ir has no shape
inference of its own; ONNX's is the reference for every standard op. Where
inference does not reach a value (a custom op upstream), the shape the
model declares for it is used.

>>> shapes = infer_shapes(model)
>>> shapes.of(pool.inputs[0]).channels
64
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

#: How far :func:`constant_value` follows Identity nodes back.
MAX_IDENTITIES = 64

Dim = int | str | None


@dataclass(frozen=True)
class ValueInfo:
    """A value's element type and shape as far as they are known: ``shape``
    None when even the rank is unknown; a dimension is an int when static,
    a string when symbolic (``"batch"``), None when unknown."""

    dtype: ir.DataType | None
    shape: tuple[Dim, ...] | None

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    @property
    def channels(self) -> int | None:
        """The static size of dimension 1 (``N, C, ...``), or None."""
        return self.dim(1)

    def dim(self, index: int) -> int | None:
        """The static size of one dimension, or None."""
        if self.shape is None or index >= len(self.shape):
            return None
        d = self.shape[index]
        return d if isinstance(d, int) else None

    @property
    def static(self) -> tuple[int, ...] | None:
        """The whole shape when every dimension is static, else None."""
        if self.shape is None or not all(isinstance(d, int) for d in self.shape):
            return None
        return tuple(self.shape)

    def describe(self) -> str:
        if self.shape is None:
            return "?"
        return "x".join("?" if d is None else str(d) for d in self.shape)


UNKNOWN = ValueInfo(None, None)


def info_of(value: ir.Value) -> ValueInfo:
    """The type and shape ``value`` itself declares (its ``value_info``, or
    an initializer's tensor)."""
    shape = value.shape
    if shape is None and value.const_value is not None:
        shape = value.const_value.shape
    dtype = value.dtype if value.dtype is not None else (
        value.const_value.dtype if value.const_value is not None else None)
    if shape is None:
        return ValueInfo(dtype, None)
    return ValueInfo(dtype, tuple(_dim(d) for d in shape))


def _dim(d: Any) -> Dim:
    if isinstance(d, int):
        return d
    value = getattr(d, "value", None)  # ir.SymbolicDim: a name or None
    return value if isinstance(value, (int, str)) else None


class ShapeTable(Mapping[str, ValueInfo]):
    """The inferred :class:`ValueInfo` of a graph's values, by value name."""

    def __init__(self, infos: dict[str, ValueInfo]) -> None:
        self._infos = infos

    def __getitem__(self, name: str) -> ValueInfo:
        return self._infos[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def of(self, value: ir.Value | None) -> ValueInfo:
        """What is known of ``value``: inferred, else declared."""
        if value is None:
            return UNKNOWN
        found = self._infos.get(value.name or "")
        declared = info_of(value)
        if found is None or (found.shape is None and declared.shape is not None):
            return declared
        return found if found.dtype is not None or declared.dtype is None else ValueInfo(declared.dtype, found.shape)


def infer_shapes(model: ir.Model) -> ShapeTable:
    """Every main-graph value's type and shape, inferred on a clone of
    ``model`` (which is left as it was); see the module docstring."""
    clone = model.clone()
    previous = logging.getLogger("onnx_ir.passes.common.shape_inference").level
    logging.getLogger("onnx_ir.passes.common.shape_inference").setLevel(logging.ERROR)
    try:  # strict_mode=False: what can be inferred is, past an op it cannot infer
        ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(clone)
    finally:
        logging.getLogger("onnx_ir.passes.common.shape_inference").setLevel(previous)
    infos = {name: info_of(v) for name, v in ir.convenience.create_value_mapping(clone.graph).items()}
    return ShapeTable(infos)


# --------------------------------------------------------------------------- constants


def constant_value(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant as a numpy array: an initializer (not a graph
    input a caller may override), a ``Constant`` node, ``ConstantOfShape`` of a
    constant shape, or such a value through a chain of ``Identity`` nodes;
    else None."""
    for _ in range(MAX_IDENTITIES):
        if value is None:
            return None
        if value.const_value is not None:
            # an initializer that is also a graph input is a default the caller may replace
            return None if value.is_graph_input() else value.const_value.numpy()
        node = value.producer()
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "Identity":
            value = node.inputs[0]
            continue
        if node.op_type == "Constant":
            tensor = ir.convenience.get_const_tensor(value)
            return None if tensor is None else tensor.numpy()
        if node.op_type == "ConstantOfShape":
            return _constant_of_shape(node)
        return None
    return None


def _constant_of_shape(node: ir.Node) -> np.ndarray | None:
    shape = constant_value(node.inputs[0]) if node.inputs else None
    if shape is None:
        return None
    attr = node.attributes.get("value")
    fill = attr.as_tensor().numpy().reshape(-1) if attr is not None else np.zeros(1, np.float32)
    return np.full(tuple(int(d) for d in shape.reshape(-1)), fill[0], dtype=fill.dtype)


# --------------------------------------------------------------------------- nodes


def producer(value: ir.Value | None) -> ir.Node | None:
    """The node that computes ``value`` (None for a graph input or initializer)."""
    return None if value is None else value.producer()


def consumers(value: ir.Value) -> list[ir.Node]:
    """The nodes that read ``value``, each once, in no promised order."""
    return list(dict.fromkeys(value.consumers()))


def is_used(value: ir.Value | None) -> bool:
    """Whether anything reads ``value``: a node or the graph's outputs."""
    return value is not None and (bool(value.uses()) or value.is_graph_output())


def attribute(node: ir.Node, name: str, default: Any = None) -> Any:
    """The Python value of a node's attribute (ints, floats, strings, lists), or ``default``."""
    attr = node.attributes.get(name)
    if attr is None:
        return default
    if attr.is_ref():
        raise ValueError(f"{label(node)}: attribute {name!r} refers to a function's attribute "
                         f"{attr.ref_attr_name!r}; inline the function first")
    value = attr.value
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, (list, tuple)):
        return [v.decode() if isinstance(v, bytes) else v for v in value]
    return value


def label(node: ir.Node) -> str:
    """How messages name a node: its name, else its op and first output (ONNX node names are optional)."""
    if node.name:
        return node.name
    first = node.outputs[0].name if node.outputs else "?"
    return f"{node.op_type}({first})"


def opset_of_node(node: ir.Node) -> int:
    """The version of the ONNX standard domain the node's op is read at:
    its own, else its graph's import (the model's, for the main graph)."""
    if node.version is not None:
        return node.version
    imports = node.graph.opset_imports if node.graph is not None else {}
    version = imports.get("", imports.get("ai.onnx"))
    if version is None:
        raise ValueError(f"{label(node)}: its graph imports no version of the ONNX domain")
    return version
