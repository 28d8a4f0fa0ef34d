"""convify.onnx.values: constants, inferred shapes (the model left as it was), producers and consumers."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from convify.onnx import values as V
from convify.onnx.files import read_model, to_proto


def graph_with_constants():
    tensor = helper.make_tensor("v", TensorProto.FLOAT, [2], [1.0, 2.0])
    nodes = [
        helper.make_node("Constant", [], ["c"], value=tensor, name="const"),
        helper.make_node("Identity", ["c"], ["c1"], name="id1"),
        helper.make_node("Identity", ["c1"], ["c2"], name="id2"),
        helper.make_node("Constant", [], ["shape"], value_ints=[2, 3], name="shape"),
        helper.make_node("ConstantOfShape", ["shape"], ["filled"], name="fill",
                         value=helper.make_tensor("f", TensorProto.FLOAT, [1], [0.5])),
        helper.make_node("ConstantOfShape", ["shape"], ["zeros"], name="zeros"),
        helper.make_node("Add", ["x", "w"], ["sum"], name="add"),
        helper.make_node("Reshape", ["sum", "to"], ["flat"], name="reshape"),
        helper.make_node("Relu", ["flat"], ["out"], name="relu"),
    ]
    inits = [numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(1, 6), "w"),
             numpy_helper.from_array(np.array([3, 2], np.int64), "to")]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("c2", "filled", "zeros", "out")]
    for o, shape in zip(outs, ([2], [2, 3], [2, 3], [3, 2])):
        o.type.tensor_type.shape.dim.extend([])
        for d in shape:
            o.type.tensor_type.shape.dim.add().dim_value = d
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])], outs,
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def values_of(model):
    return ir.convenience.create_value_mapping(model.graph)


def test_constants_through_identities_and_constant_of_shape():
    model = read_model(graph_with_constants())
    v = values_of(model)
    np.testing.assert_array_equal(V.constant_value(v["c2"]), [1.0, 2.0])
    np.testing.assert_array_equal(V.constant_value(v["filled"]), np.full((2, 3), 0.5, np.float32))
    zeros = V.constant_value(v["zeros"])
    assert zeros.dtype == np.float32 and zeros.shape == (2, 3) and not zeros.any()
    np.testing.assert_array_equal(V.constant_value(v["w"]), np.arange(6).reshape(1, 6))
    assert V.constant_value(v["sum"]) is None and V.constant_value(v["x"]) is None


def test_an_initializer_that_is_also_a_graph_input_is_no_constant():
    proto = graph_with_constants()
    proto.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [1, 6]))
    v = values_of(read_model(proto))
    assert V.constant_value(v["w"]) is None


def test_shapes_are_inferred_on_a_clone_and_the_model_keeps_its_value_info():
    proto = graph_with_constants()
    model = read_model(proto)
    table = V.infer_shapes(model)
    v = values_of(model)
    assert table.of(v["flat"]) == V.ValueInfo(ir.DataType.FLOAT, (3, 2))  # Reshape to a constant: data propagation
    assert table.of(v["sum"]).shape == ("N", 6) and table.of(v["sum"]).channels == 6
    assert table.of(v["sum"]).static is None and table.of(v["flat"]).static == (3, 2)
    assert v["flat"].shape is None  # the model itself was not given the inferred shapes
    assert to_proto(model) == proto
    assert table.of(None) == V.UNKNOWN and V.UNKNOWN.channels is None


def test_producers_consumers_labels_and_attributes():
    proto = graph_with_constants()
    proto.graph.node[6].name = ""
    model = read_model(proto)
    v = values_of(model)
    add = V.producer(v["sum"])
    assert V.label(add) == "Add(sum)" and V.label(V.producer(v["flat"])) == "reshape"
    assert [n.name for n in V.consumers(v["sum"])] == ["reshape"]
    assert V.is_used(v["sum"]) and V.is_used(v["out"]) and V.producer(v["x"]) is None
    fill = V.producer(v["filled"])
    assert V.attribute(fill, "missing", 7) == 7
    assert V.opset_of_node(add) == 13


@pytest.mark.parametrize("shape, channels", [(["N", 3, 8], 3), ([1, "C", 8], None), (None, None)])
def test_channels_need_a_static_dimension_one(shape, channels):
    info = V.ValueInfo(ir.DataType.FLOAT, None if shape is None else tuple(shape))
    assert info.channels == channels
