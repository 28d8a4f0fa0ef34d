"""Graph surgery shared by the ONNX rewrites: new nodes and initializers with
unique readable names, and one node swapped for several.

A rewrite builds its nodes with a :class:`GraphEditor` (each name derived
from the site's, ``pool/exact/axis1_0``, made unique in the model), then
:meth:`GraphEditor.replace` puts them where the old node was: the nodes
before and after keep their names, attributes and order, and the old
node's output value keeps its name, type and shape (which stay right: a
rewrite computes the same tensor), so that its consumers, a graph output
of that name and its ``value_info`` read on as before.

>>> edit = GraphEditor(model)
>>> w = edit.initializer("pool/conv.weight", weight)
>>> conv = edit.node("Conv", [x, w], {"strides": [2, 2]}, "pool/conv")
>>> edit.replace(pool_node, [conv], conv.outputs[0])
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from convify.onnx.files import file_range

#: The first IR version whose initializers need not be graph inputs too.
IR_VERSION_INITIALIZERS_APART = 4


class GraphEditor:
    """Builds nodes and initializers into ``model``'s main graph under unique names."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.graph = model.graph
        self._node_names: set[str] = set()
        self._value_names: set[str] = set()
        for graph in (self.graph, *self.graph.subgraphs()):
            for node in graph:
                self._node_names.add(node.name or "")
                self._value_names.update(v.name for v in node.outputs if v.name)
            self._value_names.update(v.name for v in (*graph.inputs, *graph.initializers.values()) if v.name)
        for function in model.functions.values():  # names there are their own scope; avoided all the same
            self._node_names.update(n.name for n in function if n.name)
        self.added: list[ir.Node] = []
        self.initializers: list[ir.Value] = []

    # ------------------------------------------------------------------ names

    def node_name(self, base: str) -> str:
        """``base``, or ``base_1``, ``base_2``, ... : the first no node of the model has."""
        return _free(base, self._node_names)

    def value_name(self, base: str) -> str:
        return _free(base, self._value_names)

    # ------------------------------------------------------------------ building

    def initializer(self, base: str, array: np.ndarray) -> ir.Value:
        """A new initializer holding ``array``; a graph input too in a model of
        IR version 3, which requires it (the checker refuses it otherwise)."""
        name = self.value_name(base)
        # a reshaped weight of the file read stays a range of that file: written by a copy, never loaded
        tensor = file_range(array, name) or ir.tensor(np.ascontiguousarray(array), name=name)
        value = ir.Value(name=name, const_value=tensor)
        self.graph.register_initializer(value)
        if (self.model.ir_version or IR_VERSION_INITIALIZERS_APART) < IR_VERSION_INITIALIZERS_APART:
            value.dtype, value.shape = value.const_value.dtype, ir.Shape(array.shape)
            self.graph.inputs.append(value)
        else:  # the tensor says its type and shape; a value_info would repeat it (see files.read_model)
            value.type, value.shape = None, None
        self.initializers.append(value)
        return value

    def node(self, op_type: str, inputs: Sequence[ir.Value | None], attributes: Mapping[str, Any] | None,
             base: str) -> ir.Node:
        """A new node of the ONNX domain (not yet in the graph: :meth:`replace`
        puts it there) with one output named like the node."""
        name = self.node_name(base)
        attrs = ir.convenience.convert_attributes(dict(attributes or {}))
        node = ir.Node("", op_type, list(inputs), attrs, name=name, num_outputs=1)
        node.outputs[0].name = self.value_name(name)
        self.added.append(node)
        return node

    # ------------------------------------------------------------------ swapping

    def replace(self, old: ir.Node, new_nodes: Sequence[ir.Node], new_output: ir.Value) -> None:
        """Put ``new_nodes`` where ``old`` was and ``new_output`` in place of
        ``old``'s first output (its name, type and shape, its consumers, the
        graph output it may be); ``old`` and its other outputs, which nothing
        may use, go."""
        # the new value takes the old one's name, type and shape; its uses, graph outputs included, move to it
        ir.convenience.replace_nodes_and_values(self.graph, old, [old], list(new_nodes), [old.outputs[0]],
                                                [new_output])


def _free(base: str, taken: set[str]) -> str:
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name
