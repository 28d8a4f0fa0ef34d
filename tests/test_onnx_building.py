"""convify.onnx.building: unique names, initializers (graph inputs too in IR version 3), one node swapped for
several in its place."""
from __future__ import annotations

import numpy as np
import onnx

from convify.onnx.building import GraphEditor
from convify.onnx.files import read_model, to_proto

from onnx_models import pool_model, rel, run


def test_names_are_the_base_or_the_first_free_suffix():
    edit = GraphEditor(read_model(pool_model([1, 2, 4, 4], kernel_shape=[2, 2])))
    assert edit.node_name("pool") == "pool_1" and edit.node_name("pool") == "pool_2"
    assert edit.node_name("fresh") == "fresh" and edit.value_name("x") == "x_1"


def test_a_swap_keeps_the_place_the_output_name_and_the_graph_output():
    proto = pool_model([1, 2, 6, 6], kernel_shape=[2, 2], strides=[2, 2], after=())
    model = read_model(proto)
    pool = next(n for n in model.graph if n.op_type == "MaxPool")
    edit = GraphEditor(model)
    weight = edit.initializer("pool/avg.weight", np.full((2, 1, 2, 2), 0.25, np.float32))
    conv = edit.node("Conv", [pool.inputs[0], weight], {"strides": [2, 2], "group": 2}, "pool/avg")
    relu = edit.node("Relu", [conv.outputs[0]], None, "pool/avg")
    edit.replace(pool, [conv, relu], relu.outputs[0])
    new = to_proto(model)
    onnx.checker.check_model(new, full_check=True)
    assert [(n.name, n.op_type) for n in new.graph.node] == [("pool/avg", "Conv"), ("pool/avg_1", "Relu"),
                                                             ("last", "Identity")]
    assert new.graph.node[2].input == ["p"] and new.graph.output == proto.graph.output
    assert not new.graph.value_info or all(v.name != "pool/avg.weight" for v in new.graph.value_info)
    x = np.abs(np.random.default_rng(0).standard_normal((1, 2, 6, 6))).astype(np.float32)
    average = x.reshape(1, 2, 3, 2, 3, 2).mean((3, 5))
    assert rel(run(new, x)[0], average) <= 1e-6


def test_initializers_are_graph_inputs_too_in_ir_version_3():
    model = read_model(pool_model([1, 2, 4, 4], kernel_shape=[2, 2], opset=8, ir_version=3))
    value = GraphEditor(model).initializer("w", np.ones(3, np.float32))
    assert value in model.graph.inputs and value.shape == (3,)
    model = read_model(pool_model([1, 2, 4, 4], kernel_shape=[2, 2]))
    value = GraphEditor(model).initializer("w", np.ones(3, np.float32))
    assert value not in model.graph.inputs and value.is_initializer()
