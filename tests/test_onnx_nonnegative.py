"""convify.onnx.nonnegative: each way of proving a value >= 0, and its counterpart that proves nothing."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from convify.onnx.files import read_model
from convify.onnx.nonnegative import nonnegative_proof

SHAPE = [1, 2, 4, 4]


def node(op, inputs, output, name=None, domain=None, **attrs):
    outputs = [output] if isinstance(output, str) else output
    return helper.make_node(op, inputs, outputs, name=name or outputs[0], domain=domain, **attrs)


def proof(nodes, opset=13, inits=(), outputs=("v",)):
    """The proof for value ``v`` of a graph of ``nodes`` over inputs ``x``, ``x2``."""
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, SHAPE) for n in ("x", "x2")]
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    graph = helper.make_graph(nodes, "g", inputs, outs, [numpy_helper.from_array(a, n) for n, a in inits])
    model = read_model(_shaped(helper.make_model(graph, opset_imports=[
        helper.make_opsetid("", opset), helper.make_opsetid("custom", 1)])))
    return nonnegative_proof(ir.convenience.create_value_mapping(model.graph)["v"])


def _shaped(model):
    from onnx import shape_inference

    model = shape_inference.infer_shapes(model)
    for out in model.graph.output:  # the checker wants a shape on each graph output
        if not out.type.tensor_type.HasField("shape"):
            out.type.tensor_type.shape.SetInParent()
    return model


RELU = node("Relu", ["x"], "r")
NEG = np.array(-1.0, np.float32)
ZERO = np.array(0.0, np.float32)


@pytest.mark.parametrize("op", ["Relu", "Sigmoid", "Softplus", "Abs", "Exp", "HardSigmoid", "Softmax"])
def test_producers_that_are_nonnegative_whatever_their_input(op):
    assert proof([node(op, ["x"], "v", name="p")]) == "p"


@pytest.mark.parametrize("op", ["Neg", "Tanh", "Elu", "LeakyRelu", "Identity"])
def test_producers_that_may_be_negative(op):
    assert proof([node(op, ["x"], "v")]) is None


def test_an_input_proves_nothing():
    assert proof([node("Identity", ["x2"], "v")]) is None


@pytest.mark.parametrize("low, proven", [(ZERO, True), (np.array(0.5, np.float32), True), (NEG, False)])
def test_clip_with_min_as_an_input(low, proven):
    got = proof([node("Clip", ["x", "low"], "v", name="clip")], inits=[("low", low)])
    assert (got == "clip") if proven else got is None


def test_clip_with_no_min_or_a_computed_min_proves_nothing():
    assert proof([node("Clip", ["x"], "v")]) is None
    assert proof([node("Clip", ["x", "", "high"], "v")], inits=[("high", np.array(6.0, np.float32))]) is None
    assert proof([node("ReduceMin", ["x2"], "m", keepdims=0), node("Clip", ["x", "m"], "v")]) is None


@pytest.mark.parametrize("attrs, proven", [({"min": 0.0}, True), ({"min": 0.0, "max": 6.0}, True),
                                           ({"min": -1.0}, False), ({}, False)])
def test_clip_with_min_as_an_attribute_before_opset_11(attrs, proven):
    got = proof([node("Clip", ["x"], "v", name="clip6", **attrs)], opset=6)
    assert (got == "clip6") if proven else got is None


@pytest.mark.parametrize("op, attrs", [("MaxPool", {"kernel_shape": [2, 2]}), ("Dropout", {}), ("Identity", {}),
                                       ("AveragePool", {"kernel_shape": [2, 2]}), ("Flatten", {}),
                                       ("Transpose", {"perm": [0, 1, 3, 2]}), ("GlobalAveragePool", {})])
def test_sign_keeping_ops_pass_a_proof_on_and_pass_no_proof_on(op, attrs):
    assert proof([RELU, node(op, ["r"], "v", **attrs)]) == "r"
    assert proof([node(op, ["x"], "v", **attrs)]) is None


def test_chains_of_sign_keeping_ops():
    chain = [RELU, node("MaxPool", ["r"], "m", kernel_shape=[2, 2]), node("Dropout", ["m"], "d"),
             node("Identity", ["d"], "i"), node("MaxPool", ["i"], "v", kernel_shape=[2, 2])]
    assert proof(chain) == "r"


def test_the_mask_of_a_dropout_and_the_indices_of_a_max_pool_are_not_its_values():
    indices = [RELU, node("MaxPool", ["r"], ["m", "idx"], kernel_shape=[2, 2]), node("Identity", ["idx"], "v")]
    assert proof(indices, outputs=()) is None  # the indices are >= 0 all the same, but not by this walk
    values = [RELU, node("MaxPool", ["r"], ["m", "idx"], kernel_shape=[2, 2]), node("Identity", ["m"], "v")]
    assert proof(values, outputs=()) == "r"


def test_concat_needs_every_input_and_max_any_one():
    sig = node("Sigmoid", ["x2"], "s")
    assert proof([RELU, sig, node("Concat", ["r", "s"], "v", axis=1)]) == "r, s"
    assert proof([RELU, node("Concat", ["r", "x2"], "v", axis=1)]) is None
    assert proof([RELU, node("Max", ["x2", "r"], "v")]) == "r"
    assert proof([node("Max", ["x", "x2"], "v")]) is None
    assert proof([RELU, node("Add", ["r", "x2"], "v")]) is None


def test_constants_that_are_all_nonnegative():
    assert proof([RELU, node("Add", ["r", "c"], "v")], inits=[("c", np.ones((1, 2, 1, 1), np.float32))]) == (
        "r, constant c")
    assert proof([RELU, node("Add", ["r", "c"], "v")], inits=[("c", -np.ones((1, 2, 1, 1), np.float32))]) is None
    nan = np.array([np.nan], np.float32)
    assert proof([RELU, node("Mul", ["r", "c"], "v")], inits=[("c", nan)]) is None


@pytest.mark.parametrize("mode, value, proven", [("constant", None, True), ("constant", ZERO, True),
                                                 ("constant", NEG, False), ("edge", None, True),
                                                 ("reflect", None, True)])
def test_pad_keeps_the_sign_unless_it_pads_with_a_negative_value(mode, value, proven):
    pads = ("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
    inputs = ["r", "pads"] + (["value"] if value is not None else [])
    inits = [pads] + ([("value", value)] if value is not None else [])
    got = proof([RELU, node("Pad", inputs, "v", mode=mode)], inits=inits)
    assert (got == "r") if proven else got is None


def test_pad_before_opset_11_takes_its_value_as_an_attribute():
    pads = [0, 0, 1, 1, 0, 0, 1, 1]
    assert proof([RELU, node("Pad", ["r"], "v", pads=pads, value=0.0)], opset=10) == "r"
    assert proof([RELU, node("Pad", ["r"], "v", pads=pads, value=-2.0)], opset=10) is None


@pytest.mark.parametrize("mode, proven", [("nearest", True), ("linear", True), ("cubic", False)])
def test_resize_keeps_the_sign_unless_it_is_cubic(mode, proven):
    scales = ("scales", np.array([1, 1, 2, 2], np.float32))
    got = proof([RELU, node("Resize", ["r", "", "scales"], "v", mode=mode)], inits=[scales])
    assert (got == "r") if proven else got is None


@pytest.mark.parametrize("alpha, proven", [(None, True), (0.0, True), (-1.0, False)])
def test_thresholded_relu_with_a_nonnegative_threshold(alpha, proven):
    attrs = {} if alpha is None else {"alpha": alpha}
    got = proof([node("ThresholdedRelu", ["x"], "v", name="t", **attrs)])
    assert (got == "t") if proven else got is None


def test_an_op_of_another_domain_proves_nothing():
    assert proof([node("Relu", ["x"], "v", domain="custom")]) is None


def test_an_unnamed_producer_is_named_by_its_op_and_output():
    relu = helper.make_node("Relu", ["x"], ["v"])
    assert proof([relu]) == "Relu(v)"
