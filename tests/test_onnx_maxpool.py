"""The ONNX frontend's max pooling rewrite: exact in every form against the original graph (onnxruntime in
float32; in float64, where onnxruntime's CPU has no Conv, ONNX's reference evaluator), conv and depthwise
structure and the average init, skip reasons, opsets, and the rest of the graph left as it was."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx_models import pool_model, reference, rel, run

from convify.core.maxtree import TreeForm
from convify.core.report import SkipCause
from convify.core.rewrites.maxpool import ExactTree, MaxPoolOptions, PoolRecord
from convify.errors import UsageError
from convify.onnx.engine import report_of, rewrite_onnx
from convify.onnx.files import to_proto

FORMS = [f.value for f in TreeForm]

#: (spatial size, MaxPool attributes): 1-, 2- and 3-d windows, asymmetric pads, dilation, ceil_mode, auto_pad.
POOLS = {
    "1d_asym_ceil": ((11,), dict(kernel_shape=[3], strides=[2], pads=[1, 2], ceil_mode=1)),
    "1d_dilated": ((10,), dict(kernel_shape=[3], strides=[1], dilations=[3], pads=[2, 1])),
    "2d_asym_dilated_ceil": ((9, 8), dict(kernel_shape=[3, 2], strides=[2, 1], pads=[1, 0, 2, 1],
                                          dilations=[1, 2], ceil_mode=1)),
    "2d_dilated_both": ((9, 8), dict(kernel_shape=[3, 2], strides=[1, 2], pads=[2, 1, 1, 1], dilations=[2, 2],
                                     ceil_mode=1)),
    "2d_same_upper": ((9, 8), dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")),
    "2d_same_lower": ((7, 8), dict(kernel_shape=[2, 3], strides=[2, 2], auto_pad="SAME_LOWER")),
    "2d_valid_ceil": ((10, 9), dict(kernel_shape=[3, 3], strides=[3, 2], auto_pad="VALID", ceil_mode=1)),
    "3d_asym": ((5, 6, 7), dict(kernel_shape=[2, 3, 2], strides=[2, 1, 2], pads=[0, 1, 1, 1, 1, 0],
                                dilations=[1, 1, 2], ceil_mode=1)),
}


def rewrite(model, **options):
    return to_proto(rewrite_onnx(model, MaxPoolOptions(**options)))


def checked(proto):
    onnx.checker.check_model(proto, full_check=True)
    return proto


def site_nodes(proto, site="pool"):
    return [n for n in proto.graph.node if n.name.startswith(f"{site}/")]


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "ungrouped"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("before", [(), ("Relu",)], ids=["signed", "relu"])
@pytest.mark.parametrize("case", list(POOLS))
def test_exact_is_exact_in_float32_and_float64(case, before, form, grouped):
    spatial, attrs = POOLS[case]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, *spatial))
    for dtype, bound, execute in ((np.float32, 1e-6, run), (np.float64, 1e-12, reference)):
        original = pool_model([2, 3, *spatial], before=before, dtype=dtype, **attrs)
        new = checked(rewrite(original, mode="exact", exact_form=form, grouped=grouped))
        assert report_of(new).replaced, report_of(new)
        assert all(i.data_type == (TensorProto.FLOAT if dtype == np.float32 else TensorProto.DOUBLE)
                   for i in new.graph.initializer if i.name.endswith(".weight"))
        assert rel(execute(new, x.astype(dtype))[0], run(original, x.astype(dtype))[0]) <= bound
        notes = report_of(new).replaced[0].notes
        assert any("no DOUBLE Conv kernel" in n for n in notes) is (dtype == np.float64)
        assert any("resolved at the input size" in n for n in notes) is ("same" in case)


@pytest.mark.parametrize("before", [(), ("Relu",)], ids=["signed", "relu"])
@pytest.mark.parametrize("case", ["1d_asym_ceil", "2d_asym_dilated_ceil", "2d_dilated_both", "3d_asym"])
def test_one_rewrite_of_a_dynamic_size_is_exact_at_every_size(case, before):
    spatial, attrs = POOLS[case]
    original = pool_model(["N", 3, *(f"s{a}" for a in range(len(spatial)))], before=before, **attrs)
    new = checked(rewrite(original, mode="exact"))
    assert not report_of(new).skipped
    rng = np.random.default_rng(1)
    for grow in range(4):
        x = rng.standard_normal((1, 3, *(n + grow for n in spatial))).astype(np.float32)
        assert rel(run(new, x)[0], run(original, x)[0]) <= 1e-6


def test_the_verifier_form_after_a_relu_is_ungrouped_convolutions_and_relus_only():
    original = pool_model([1, 4, 9, 9], before=["Relu"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 2, 2],
                          ceil_mode=1)
    new = checked(rewrite(original, mode="exact", exact_form="separable", grouped=False))
    nodes = site_nodes(new)
    assert {n.op_type for n in nodes} == {"Conv", "Relu"}
    assert all(helper.get_attribute_value(next(a for a in n.attribute if a.name == "group")) == 1
               for n in nodes if n.op_type == "Conv")
    first = nodes[0]  # the zeros, ceil_mode's too, are inside the first convolution's pads: no Pad node
    assert helper.get_attribute_value(next(a for a in first.attribute if a.name == "pads")) == [0, 1, 0, 2]
    tree = report_of(new).replaced[0].detail.tree
    assert isinstance(tree, ExactTree) and not tree.signed and tree.sign_proof == "pre0" and not tree.grouped


def test_a_signed_input_is_padded_with_copies_and_a_relu_input_with_zeros_inside():
    attrs = dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    signed = rewrite(pool_model([1, 2, 8, 8], **attrs), mode="exact")
    pad = site_nodes(signed)[0]
    assert pad.op_type == "Pad" and helper.get_attribute_value(pad.attribute[0]) == b"edge"
    assert report_of(signed).replaced[0].detail.tree.signed
    relu = rewrite(pool_model([1, 2, 8, 8], before=["Relu"], **attrs), mode="exact")
    assert "Pad" not in {n.op_type for n in site_nodes(relu)}
    assert "inside the convolutions' pads" in report_of(relu).replaced[0].detail.tree.padding


def test_the_chain_form_is_depthwise_convolutions_relus_and_additions():
    new = rewrite(pool_model([1, 5, 8, 8], before=["Relu"], kernel_shape=[3, 3], strides=[2, 2]), mode="exact")
    nodes = site_nodes(new)
    assert [n.op_type for n in nodes].count("Conv") == 6 and {n.op_type for n in nodes} == {"Conv", "Relu", "Add"}
    weights = {i.name: i for i in new.graph.initializer}
    assert all(tuple(weights[n.input[1]].dims[:2]) == (5, 1) for n in nodes if n.op_type == "Conv")
    row = report_of(new).replaced[0]
    assert row.exact and row.detail.mode == "exact" and row.detail.tree.form is TreeForm.CHAIN
    assert row.detail.tree.channels == (1,) * 6 and row.detail.tree.relu_levels == 4
    assert "pool/exact/axis1_0 (Conv)" in row.notes[1] and row.module == "pool/exact"


# --------------------------------------------------------------------------- conv and depthwise


@pytest.mark.parametrize("depthwise", [False, True])
def test_conv_and_depthwise_are_one_conv_with_the_window_and_the_average_init(depthwise):
    attrs = dict(kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 1, 1])
    original = pool_model([1, 4, 9, 8], **attrs)
    new = checked(rewrite(original, mode="depthwise" if depthwise else "conv"))
    conv, = site_nodes(new)
    got = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    assert conv.op_type == "Conv" and got["group"] == (4 if depthwise else 1)
    assert got["pads"] == [1, 0, 1, 1] and got["strides"] == [2, 2] and got["kernel_shape"] == [3, 2]
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in new.graph.initializer}
    assert weights[conv.input[1]].shape == ((4, 1, 3, 2) if depthwise else (4, 4, 3, 2))
    assert not weights[conv.input[2]].any()
    average = pool_model([1, 4, 9, 8], **attrs)
    average.graph.node[0].op_type = "AveragePool"
    average.graph.node[0].attribute.append(helper.make_attribute("count_include_pad", 1))
    x = np.random.default_rng(2).standard_normal((1, 4, 9, 8)).astype(np.float32)
    assert rel(run(new, x)[0], run(average, x)[0]) <= 1e-6  # the average init is average pooling, zeros counted
    row = report_of(new).replaced[0]
    assert not row.exact and isinstance(row.detail, PoolRecord) and row.detail.conv == conv.name
    assert row.detail.depthwise is depthwise and any("not exact" in n for n in report_of(new).notes)


def test_conv_takes_ceil_modes_windows_as_pads_after_the_input():
    original = pool_model([1, 2, 8, 8], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)
    new = checked(rewrite(original, mode="conv", init="kaiming"))
    conv, = site_nodes(new)
    assert helper.get_attribute_value(next(a for a in conv.attribute if a.name == "pads")) == [0, 0, 1, 1]
    x = np.zeros((1, 2, 8, 8), np.float32)
    assert run(new, x)[0].shape == run(original, x)[0].shape == (1, 2, 4, 4)


def test_fold_and_fit_are_refused_naming_what_applies():
    model = pool_model([1, 2, 8, 8], kernel_shape=[2, 2])
    with pytest.raises(UsageError, match="pooling mode 'fold'.*no ONNX implementation.*'conv', 'depthwise', 'exact'"):
        rewrite_onnx(model, MaxPoolOptions(mode="fold"))
    with pytest.raises(UsageError, match="init='fit' fits weights on calibration data"):
        rewrite_onnx(model, MaxPoolOptions(mode="conv", init="fit"))


# --------------------------------------------------------------------------- skipped sites


def skipped_reason(proto, **options):
    rep = report_of(rewrite(proto, **(options or {"mode": "exact"})))
    assert not rep.replaced
    (row,) = rep.skipped
    return row.reason


def test_used_indices_are_skipped_and_unused_ones_dropped():
    assert "Indices output is used (by a graph output)" in skipped_reason(
        pool_model([1, 2, 6, 6], kernel_shape=[2, 2], indices="output"))
    model = pool_model([1, 2, 6, 6], kernel_shape=[2, 2], indices="unused")
    new = checked(rewrite(model, mode="exact"))
    assert any(v.name == "idx" for v in model.graph.value_info)
    assert "idx" not in {o for n in new.graph.node for o in n.output} | {v.name for v in new.graph.value_info}
    x = np.random.default_rng(3).standard_normal((1, 2, 6, 6)).astype(np.float32)
    assert rel(run(new, x)[0], run(model, x)[0]) <= 1e-6


@pytest.mark.parametrize("shape, dtype, opset, options, reason", [
    ([1, 2, 6, 6], np.int8, 12, {"mode": "exact"}, "its input is INT8; a convolution takes floating point only"),
    ([1, "C", 6, 6], np.float32, 13, {"mode": "exact"}, r"no static channel count"),
    ([1, 2, 6, 6], np.float16, 13, {"mode": "exact"}, "FLOAT16; this mode builds FLOAT, DOUBLE weights"),
])
def test_inputs_a_convolution_cannot_take_are_skipped(shape, dtype, opset, options, reason):
    model = pool_model(shape, dtype=dtype, opset=opset, kernel_shape=[2, 2])
    assert reason in skipped_reason(model, **options)
    (row,) = report_of(rewrite(model, **options)).skipped  # read back from the file's metadata, the cause typed
    assert row.cause is (SkipCause.UNSIZED if "channel" in reason else None)


def test_float16_takes_the_conv_mode():
    model = pool_model([1, 2, 6, 6], dtype=np.float16, kernel_shape=[2, 2], strides=[2, 2])
    new = checked(rewrite(model, mode="depthwise"))
    assert report_of(new).replaced and {i.data_type for i in new.graph.initializer} == {TensorProto.FLOAT16}


@pytest.mark.parametrize("shape, attrs, reason", [
    ([1, 2, 6, 6], dict(kernel_shape=[2, 2], pads=[2, 0, 0, 0]), "window 0 holds padding only"),
    ([1, 2, "h", 6], dict(kernel_shape=[2, 2], pads=[2, 0, 0, 0]), "a window holds padding only"),
    ([1, 2, "h", 6], dict(kernel_shape=[2, 2], auto_pad="SAME_UPPER"), "dynamic along spatial axis 0"),
    ([1, 2, 7, 7], dict(kernel_shape=[3, 3], dilations=[2, 2], auto_pad="SAME_LOWER"), "as if the kernel"),
    ([1, 2, 3, 6], dict(kernel_shape=[1, 1], strides=[3, 3], auto_pad="SAME_UPPER"), "pads spatial axis 0 by -2"),
    ([1, 2, 2, 6], dict(kernel_shape=[3, 3], auto_pad="VALID"), "its output is empty along spatial axis 0"),
])
def test_windows_it_cannot_build_are_skipped_with_the_reason(shape, attrs, reason):
    model = pool_model(shape, out_shape=["N", 2, "a", "b"], **attrs)
    assert reason in skipped_reason(model)


def test_a_max_pool_inside_a_subgraph_is_skipped_with_the_reason():
    body = helper.make_graph([helper.make_node("MaxPool", ["x"], ["inner"], name="inner_pool", kernel_shape=[2, 2])],
                             "then_body", [], [helper.make_tensor_value_info("inner", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["same"])], "else_body", [],
                              [helper.make_tensor_value_info("same", TensorProto.FLOAT, None)])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=other, name="branch")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4]),
         helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.graph.output[0].type.tensor_type.shape.SetInParent()
    assert "inside the subgraph 'then_body'" in skipped_reason(model)


# --------------------------------------------------------------------------- opsets and the rest of the graph


@pytest.mark.parametrize("opset, ir_version", [(8, 3), (10, 5), (11, 6), (12, 7), (22, 10)])
def test_every_opset_and_ir_version_3s_initializers_as_inputs(opset, ir_version):
    attrs = dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 1, 1])
    if opset >= 10:
        attrs.update(ceil_mode=1)
    model = pool_model([1, 2, 9, 9], opset=opset, ir_version=ir_version, **attrs)
    x = np.random.default_rng(4).standard_normal((1, 2, 9, 9)).astype(np.float32)
    for form in FORMS:
        new = checked(rewrite(model, mode="exact", exact_form=form))
        assert new.opset_import == model.opset_import and new.ir_version == ir_version
        inputs = {i.name for i in new.graph.input}
        assert all((i.name in inputs) == (ir_version < 4) for i in new.graph.initializer)
        assert rel(run(new, x)[0], run(model, x)[0]) <= 1e-6


def test_pad_before_opset_2_takes_paddings():
    model = pool_model([1, 2, 6, 6], opset=1, ir_version=3, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    pad = site_nodes(checked(rewrite(model, mode="exact")))[0]
    assert pad.op_type == "Pad" and [a.name for a in pad.attribute] == ["mode", "paddings"]


def test_the_rest_of_the_graph_is_left_byte_for_byte():
    model = pool_model([1, 3, 8, 8], before=["Relu", "Sigmoid"], after=["Identity", "Relu"], kernel_shape=[2, 2],
                       strides=[2, 2])
    model.metadata_props.add(key="author", value="me")
    model.doc_string = "a model"
    new = checked(rewrite(model, mode="exact"))
    kept = [n.SerializeToString() for n in model.graph.node if n.name != "pool"]
    assert [n.SerializeToString() for n in new.graph.node if not n.name.startswith("pool/")] == kept
    names = [n.name for n in new.graph.node]
    assert names[:2] == ["pre0", "pre1"] and names[-3:] == ["post0", "post1", "last"]
    assert new.graph.input == model.graph.input and new.graph.output == model.graph.output
    assert [v for v in new.graph.value_info if v.name != "p"] == [v for v in model.graph.value_info if v.name != "p"]
    assert {(p.key, p.value) for p in new.metadata_props if p.key != "convify.report"} == {("author", "me")}
    assert new.doc_string == "a model" and new.producer_name == model.producer_name
    consumer = next(n for n in new.graph.node if n.name == "post0")
    assert consumer.input == ["p"]  # the pool's output keeps its name


def test_new_names_are_unique_and_derived_from_the_pool():
    model = pool_model([1, 2, 6, 6], kernel_shape=[2, 2], name="pool/exact/axis1_0")
    new = checked(rewrite(model, mode="exact"))
    names = [n.name for n in new.graph.node]
    assert len(set(names)) == len(names)
    assert "pool/exact/axis1_0/exact/axis1_0" in names
