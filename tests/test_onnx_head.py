"""The ONNX frontend's head rewrite: every tf2onnx-style head (alone and after the exact max pooling) exact in
onnxruntime, and in float64 by ONNX's reference evaluator; torchvision exports of both exporters; onnx's light
zoo; dense score maps (symbolic sizes, the Softmax on the class axis before and after opset 13, a crop); gap
modes; weights delivered every way; skip reasons; the rest of the graph left as it was."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from convify.core.rewrites.head import Exactness, HeadOptions, HeadRecord, PoolRemoval
from convify.core.rewrites.maxpool import MaxPoolOptions
from convify.onnx.engine import report_of, rewrite_onnx
from convify.onnx.files import read_model, to_proto, write_model
from convify.onnx.rewrites.head.reading import read_linear
from convify.onnx.values import infer_shapes

from onnx_material import (Between, Head, WeightDelivery, light_with_random_weights, light_zoo, softmax_input,
                           tf2onnx_style_classifier, torchvision_export, vnncomp_style_cnn, with_outputs)
from onnx_models import reference, rel, run

LAYERS = ("Gemm", "MatMul")

#: Every option of each tf2onnx-style head.
VARIANTS = [
    (Head.RESHAPE_MATMUL, {}), (Head.RESHAPE_MATMUL, {"computed_shape": True}),
    (Head.RESHAPE_MATMUL, {"bias_left": True}), (Head.RESHAPE_MATMUL, {"between": Between.DROPOUT}),
    (Head.FLATTEN_GEMM, {}), (Head.FLATTEN_GEMM, {"between": Between.IDENTITY}),
    (Head.GLOBAL_POOL_GEMM, {}), (Head.GLOBAL_POOL_GEMM, {"between": Between.DROPOUT}),
    (Head.REDUCE_MEAN_GEMM, {}), (Head.REDUCE_MEAN_GEMM, {"keepdims": False}),
    (Head.REDUCE_MEAN_GEMM, {"between": Between.IDENTITY}),
]


def variant_id(variant) -> str:
    head, options = variant
    return "-".join([head.value, *(f"{k}={getattr(v, 'value', v)}" for k, v in options.items())])


def rewrite(model, *options, **kwargs) -> onnx.ModelProto:
    return to_proto(rewrite_onnx(model, list(options) or HeadOptions(), **kwargs))


def checked(proto: onnx.ModelProto) -> onnx.ModelProto:
    onnx.checker.check_model(proto, full_check=True)
    return proto


def census(proto: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in proto.graph.node)


def nhwc(rng: np.random.Generator, height: int = 16, width: int = 16) -> np.ndarray:
    return rng.standard_normal((1, height, width, 3)).astype(np.float32)


def logits_and_output(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    """The graph output and the Softmax's input (the logits), in onnxruntime."""
    return run(with_outputs(model, [softmax_input(model)]), x)


def dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


# --------------------------------------------------------------------------- tf2onnx-style heads


@pytest.mark.parametrize("pool", ["kept", "exact"])
@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_every_tf2onnx_head_becomes_exact_convolutions(variant, opset, pool):
    head, options = variant
    model = tf2onnx_style_classifier(head=head, opset=opset, **options)
    passes = [MaxPoolOptions(mode="exact")] if pool == "exact" else []
    new = checked(rewrite(model, *passes, HeadOptions(mode="conv")))
    assert not census(new).keys() & set(LAYERS), census(new)
    rep = report_of(new)
    (row,) = rep.passes[-1].replaced
    assert not rep.passes[-1].skipped and rep.exact and row.exact
    layers = [n.name for n in model.graph.node if n.op_type in LAYERS]
    assert isinstance(row.detail, HeadRecord) and row.detail.linears == tuple(layers)
    assert row.detail.exactness is Exactness.EXACT and row.out_shape == (1, 10)
    assert row.detail.kernel == ((4, 4) if head in (Head.RESHAPE_MATMUL, Head.FLATTEN_GEMM) else (1, 1))
    assert new.graph.output == model.graph.output and new.graph.input == model.graph.input
    x = nhwc(np.random.default_rng(0))
    (probs, logits), (old_probs, old_logits) = logits_and_output(new, x), logits_and_output(model, x)
    assert rel(logits, old_logits) <= 1e-5 and rel(probs, old_probs) <= 1e-5


def test_the_rest_of_the_graph_is_left_as_it_was():
    model = tf2onnx_style_classifier(head=Head.RESHAPE_MATMUL, between=Between.DROPOUT)
    new = checked(rewrite(model))
    head = {"flatten/Reshape", "flatten/Const", "max_pooling2d_1/MaxPool__20", "dense/MatMul", "dense/BiasAdd",
            "dense_1/MatMul", "dense_1/BiasAdd"}
    prefix = "StatefulPartitionedCall/sequential/"
    old = [n for n in model.graph.node if n.name.removeprefix(prefix) not in head]
    kept = {n.name: n for n in new.graph.node}
    trunk = [n for n in old if n.op_type not in ("Relu", "Dropout", "Softmax") or "dense" not in n.name]
    assert [kept[n.name].SerializeToString() for n in trunk] == [n.SerializeToString() for n in trunk]
    for node in old:  # the head's Relu, Dropout and the Softmax stay, by name, op and attributes
        assert kept[node.name].op_type == node.op_type and kept[node.name].attribute == node.attribute
    assert [n.name for n in new.graph.node][:len(trunk) - 3] == [n.name for n in trunk][:-3]
    weights = {t.name for t in new.graph.initializer}
    assert not any("ReadVariableOp" in w or w.endswith("flatten/Const") for w in weights)
    assert {t.name for t in model.graph.initializer if "conv2d" in t.name} <= weights
    rep = report_of(new)
    notes = rep.replaced[0].notes
    assert f"ONNX nodes added: {prefix}dense/MatMul/conv (Conv), {prefix}dense_1/MatMul/conv (Conv), " \
           f"{prefix}dense_1/MatMul/conv/flatten (Flatten)" in notes
    assert any(n.startswith("ONNX nodes replaced: ") and f"{prefix}flatten/Reshape (Reshape)" in n for n in notes)


def as_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model in DOUBLE: its float initializers, inputs and outputs."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for tensor in out.graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float64), tensor.name))
    for value in (*out.graph.input, *out.graph.output, *out.graph.value_info):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.DOUBLE
    return out


@pytest.mark.parametrize("head", [Head.RESHAPE_MATMUL, Head.FLATTEN_GEMM, Head.REDUCE_MEAN_GEMM, "vnncomp"])
def test_float64_is_exact_to_float64_rounding_by_the_reference_evaluator(head):
    rng = np.random.default_rng(1)
    if head == "vnncomp":
        model, x = as_float64(vnncomp_style_cnn()), rng.standard_normal((1, 1, 28, 28))
    else:
        model, x = as_float64(tf2onnx_style_classifier(head=head, softmax=False)), nhwc(rng).astype(np.float64)
    new = checked(rewrite(model))
    assert {t.data_type for t in new.graph.initializer if t.name.endswith((".weight", ".bias"))} == {
        TensorProto.DOUBLE}
    assert rel(reference(new, x)[0], reference(model, x)[0]) <= 1e-12


# --------------------------------------------------------------------------- dense


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("head", [Head.RESHAPE_MATMUL, Head.FLATTEN_GEMM])
def test_dense_gives_a_softmax_map_over_the_classes_at_any_size(head, opset):
    model = tf2onnx_style_classifier(head=head, opset=opset)
    new = checked(rewrite(model, HeadOptions(dense=True)))
    assert dims(new.graph.input[0]) == [1, "height", "width", 3]
    assert dims(new.graph.output[0]) == [1, 10, "out_height", "out_width"]
    (row,) = report_of(new).replaced
    assert row.out_shape == (1, 10, 1, 1) and row.detail.dense and row.exact
    rng = np.random.default_rng(2)
    x = nhwc(rng)
    at_size = run(new, x)[0]
    assert at_size.shape == (1, 10, 1, 1) and rel(at_size.reshape(1, 10), run(model, x)[0]) <= 1e-5
    larger = run(new, nhwc(rng, 32, 24))[0]
    assert larger.shape == (1, 10, 5, 3)
    np.testing.assert_allclose(larger.sum(axis=1), 1.0, rtol=1e-5)  # a distribution at each position
    assert census(new)["Transpose"] == census(model)["Transpose"] - 1 + (2 if opset < 13 else 0)


def no_padding_classifier() -> onnx.ModelProto:
    """Conv 3x3 (no padding) -> Relu -> MaxPool 2/2 -> Flatten -> Gemm -> Relu -> Gemm on 10x10 inputs: each
    position of its dense map sees exactly one 10x10 crop of a larger input."""
    rng = np.random.default_rng(3)
    weights = {"conv.w": rng.standard_normal((4, 2, 3, 3)) * 0.5, "conv.b": rng.standard_normal(4) * 0.1,
               "fc1.w": rng.standard_normal((8, 64)) * 0.2, "fc1.b": rng.standard_normal(8) * 0.1,
               "fc2.w": rng.standard_normal((5, 8)) * 0.3, "fc2.b": rng.standard_normal(5) * 0.1}
    nodes = [helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], name="conv", kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc1.w", "fc1.b"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["hr"], name="fc1_relu"),
             helper.make_node("Gemm", ["hr", "fc2.w", "fc2.b"], ["y"], name="fc2", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 10, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
                              [numpy_helper.from_array(w.astype(np.float32), k) for k, w in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_each_position_of_a_dense_map_is_the_original_on_its_crop():
    model = no_padding_classifier()
    new = checked(rewrite(model, HeadOptions(dense=True)))
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 2, 10, 10)).astype(np.float32)
    assert rel(run(new, x)[0].reshape(1, 5), run(model, x)[0]) <= 1e-5
    big = rng.standard_normal((1, 2, 16, 18)).astype(np.float32)
    scores = run(new, big)[0]
    assert scores.shape == (1, 5, 4, 5)  # a stride of 2 between positions: (16 - 10) / 2 + 1, (18 - 10) / 2 + 1
    for i, j in [(0, 0), (1, 3), (3, 4)]:
        crop = big[:, :, 2 * i:2 * i + 10, 2 * j:2 * j + 10]
        assert rel(scores[:, :, i, j], run(model, crop)[0]) <= 1e-5


# --------------------------------------------------------------------------- torchvision exports


@pytest.fixture(scope="session")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    folder = tmp_path_factory.mktemp("head_exports")
    made: dict[tuple[str, str], Path] = {}

    def get(name: str, exporter: str) -> Path:
        if (name, exporter) not in made:
            made[name, exporter] = torchvision_export(name, exporter, folder)
        return made[name, exporter]

    return get


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_resnet18_exports_head_is_exact_and_its_dense_map_averages_to_the_logits(exports, exporter, tmp_path):
    path = exports("resnet18", exporter)
    x = np.random.default_rng(5).standard_normal((1, 3, 64, 64)).astype(np.float32)
    original = run(onnx.load(str(path)), x)[0]
    for dense in (False, True):
        out = tmp_path / f"dense{dense}.onnx"
        write_model(rewrite_onnx(path, HeadOptions(dense=dense)), out)
        onnx.checker.check_model(str(out), full_check=True)
        new = onnx.load(str(out))
        assert not census(new).keys() & set(LAYERS)
        (row,) = report_of(new).replaced
        front = "ReduceMean -> Reshape" if exporter == "dynamo" else "GlobalAveragePool -> Flatten"
        assert row.old == f"{front}(512x1x1) -> Gemm 512->1000"
        scores = run(new, x)[0]
        if not dense:
            assert row.exact and row.detail.removal is PoolRemoval.NONE and rel(scores, original) <= 1e-5
            assert "GlobalAveragePool" in census(new) or "ReduceMean" in census(new)
            continue
        assert row.detail.exactness is Exactness.SCORE_MAP_MEAN and row.detail.removal is PoolRemoval.GLOBAL
        assert scores.shape == row.out_shape == (1, 1000, 2, 2) and rel(scores.mean(axis=(2, 3)), original) <= 1e-5
        assert not census(new).keys() & {"GlobalAveragePool", "ReduceMean", "Flatten", "Reshape"}
        assert run(new, np.zeros((1, 3, 96, 128), np.float32))[0].shape == (1, 1000, 3, 4)


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_squeezenet_has_nothing_to_rewrite(exports, exporter):
    model = onnx.load(str(exports("squeezenet1_1", exporter)))
    new = rewrite(model)
    rep = report_of(new)
    assert not rep.replaced and not rep.skipped
    assert rep.notes == ("no Gemm or MatMul node found in the graph: nothing to rewrite",)
    assert new.graph == model.graph


# --------------------------------------------------------------------------- onnx's light zoo


def light(name: str, delivery: WeightDelivery) -> onnx.ModelProto:
    path = next(p for p in light_zoo() if p.stem == f"light_{name}")
    return light_with_random_weights(path, np.random.default_rng(0), delivery)


def test_light_alexnet_reshape_gemm_head_with_weights_through_constant_and_identity_nodes():
    model = light("bvlc_alexnet", WeightDelivery.NODES)
    new = checked(rewrite(model))
    (row,) = report_of(new).replaced
    assert row.old == "Reshape(256x6x6) -> Gemm 9216->4096->4096->1000" and row.exact
    assert row.new == "Conv(256, 4096, k=6x6) -> Conv(4096, 4096, k=1x1) -> Conv(4096, 1000, k=1x1) -> Flatten"
    assert not census(new).keys() & set(LAYERS) and census(new)["Dropout"] == 2
    gone = {"fc6_w_0", "fc6_b_0", "fc7_w_0", "fc7_b_0", "fc8_w_0", "fc8_b_0"}
    assert not any(o.split("__")[0] in gone for n in new.graph.node for o in n.output)
    assert not any(t.name.split("__")[0] in gone for t in new.graph.initializer)
    assert {i.name for i in new.graph.input} == {t.name for t in new.graph.initializer} | {"data_0"}  # IR 3
    x = np.random.default_rng(6).standard_normal((1, 3, 224, 224)).astype(np.float32)
    (probs, logits), (old_probs, old_logits) = logits_and_output(new, x), logits_and_output(model, x)
    assert rel(logits, old_logits) <= 1e-5 and rel(probs, old_probs) <= 1e-5


@pytest.mark.parametrize("delivery", list(WeightDelivery))
def test_light_shufflenet_dense_softmax_of_opset_9_is_taken_per_position(delivery):
    model = light("shufflenet", delivery)
    new = checked(rewrite(model, HeadOptions(dense=True)))
    (row,) = report_of(new).replaced
    assert row.detail.removal is PoolRemoval.GLOBAL and row.detail.exactness is Exactness.PER_POSITION
    assert new.opset_import[0].version == 9
    x = np.random.default_rng(7).standard_normal((1, 3, 224, 224)).astype(np.float32)
    probs = run(new, x)[0]
    assert probs.shape == (1, 1000, 7, 7)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    conv = checked(rewrite(model))
    assert rel(run(conv, x)[0], run(model, x)[0]) <= 1e-5


def test_light_inception_v1_weight_reshaped_before_its_gemm():
    model = light("inception_v1", WeightDelivery.INITIALIZERS)
    new = checked(rewrite(model))
    (row,) = report_of(new).replaced
    assert row.exact and "AveragePool" in census(new) and not census(new).keys() & set(LAYERS)
    x = np.random.default_rng(8).standard_normal((1, 3, 224, 224)).astype(np.float32)
    assert rel(run(new, x)[0], run(model, x)[0]) <= 1e-5


# --------------------------------------------------------------------------- small graphs, one behaviour each


def small_model(nodes, weights: dict, x_shape=(1, 4, 3, 3), outputs=("y",), opset: int = 13,
                inputs: dict | None = None) -> onnx.ModelProto:
    """``x`` -> ``nodes`` -> ``outputs``, the ``weights`` as float32 (int64 for integer arrays) initializers."""
    tensors = [numpy_helper.from_array(np.asarray(v, np.int64 if np.asarray(v).dtype.kind == "i" else np.float32), k)
               for k, v in weights.items()]
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))]
    graph_inputs += [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(s)) for k, s in (inputs or {}).items()]
    graph = helper.make_graph(nodes, "g", graph_inputs, [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                                                         for o in outputs], tensors)
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def weights(*shapes, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) * 0.3 for s in shapes]


def node(op: str, inputs, output: str, **attributes) -> onnx.NodeProto:
    return helper.make_node(op, list(inputs), [output], name=output, **attributes)


def same_outputs(new: onnx.ModelProto, model: onnx.ModelProto, x_shape=(1, 4, 3, 3), bound: float = 1e-5) -> None:
    x = np.random.default_rng(9).standard_normal(x_shape).astype(np.float32)
    for a, b in zip(run(new, x), run(model, x), strict=True):
        assert rel(a, b) <= bound


def skipped(model: onnx.ModelProto) -> dict[str, str]:
    rep = report_of(rewrite(model))
    return {s.name: s.reason for s in rep.skipped}


def test_layers_that_are_no_head_are_skipped_with_the_reason():
    w, b, t = weights((3, 36), (3,), (1, 3))
    flat = node("Flatten", ["x"], "f")
    assert skipped(small_model([flat, node("Gemm", ["f", "w", "b"], "y", transA=1)], {"w": t, "b": b})) == {
        "y": "transA=1: the Gemm multiplies the transposed input, mixing the samples of a batch; no convolution "
             "computes that"}
    vector = small_model([node("Gemm", ["x", "w", "b"], "y", transB=1)], {"w": w, "b": b}, x_shape=(1, 36))
    assert skipped(vector) == {"y": "not a head: its input is not a flattened feature map"}
    tokens = small_model([node("MatMul", ["x", "w"], "y")], {"w": w.T}, x_shape=(1, 5, 36))
    assert skipped(tokens)["y"].startswith("not a head: its input has rank 3")
    given = small_model([flat, node("Gemm", ["f", "w", "b"], "y", transB=1)], {"b": b}, inputs={"w": (3, 36)})
    assert skipped(given)["y"].startswith("its weight B is not a constant")
    batch2 = small_model([flat, node("Gemm", ["f", "w", "c"], "y", transB=1)], {"w": w, "c": np.ones((2, 3))},
                         x_shape=(2, 4, 3, 3))
    assert "differs between samples" in skipped(batch2)["y"]
    swapped = small_model([node("Transpose", ["x"], "t", perm=[0, 1, 3, 2]), node("Flatten", ["t"], "f"),
                           node("Gemm", ["f", "w", "b"], "y", transB=1)], {"w": w, "b": b})
    assert "rearranges its dimensions otherwise than to channels last" in skipped(swapped)["y"]
    dynamic = small_model([flat, node("Gemm", ["f", "w", "b"], "y", transB=1)], {"w": w, "b": b},
                          x_shape=(1, 4, "h", "w"))
    assert "has no static size" in skipped(dynamic)["y"]


def test_a_squeeze_excitation_layer_is_no_head_and_the_classifier_after_it_is():
    w1, w2, b2 = weights((4, 4), (3, 36), (3,))
    nodes = [node("GlobalAveragePool", ["x"], "g"), node("Flatten", ["g"], "gf"),
             node("Gemm", ["gf", "w1"], "se", transB=1), node("Sigmoid", ["se"], "gate"),
             node("Reshape", ["gate", "shape"], "gate4"), node("Mul", ["x", "gate4"], "excited"),
             node("Flatten", ["excited"], "f"), node("Gemm", ["f", "w2", "b2"], "y", transB=1)]
    model = small_model(nodes, {"w1": w1, "w2": w2, "b2": b2, "shape": np.array([1, 4, 1, 1])})
    new = checked(rewrite(model))
    rep = report_of(new)
    assert [r.name for r in rep.replaced] == ["y"] and rep.replaced[0].detail.kernel == (3, 3)
    assert rep.skipped[0].name == "se" and rep.skipped[0].reason.startswith(
        "not a head: its result flows back into a feature map")
    assert census(new)["Gemm"] == 1
    same_outputs(new, model)


@pytest.mark.parametrize("bias", ["absent", "empty", "scalar", "row", "beta0"])
def test_a_gemm_bias_absent_empty_or_broadcast(bias):
    w, b = weights((3, 36), (3,))
    inputs, extra, attrs = {"absent": (["f", "w"], {}, {}), "empty": (["f", "w", ""], {}, {}),
                            "scalar": (["f", "w", "c"], {"c": np.array(0.7)}, {}),
                            "row": (["f", "w", "c"], {"c": b[None]}, {"beta": 0.5}),
                            "beta0": (["f", "w", "c"], {"c": b}, {"beta": 0.0})}[bias]
    model = small_model([node("Flatten", ["x"], "f"), node("Gemm", inputs, "y", transB=1, **attrs)], {"w": w, **extra})
    new = checked(rewrite(model))
    (conv,) = [n for n in new.graph.node if n.op_type == "Conv"]
    assert len(conv.input) == (2 if bias in ("absent", "empty", "beta0") else 3)
    same_outputs(new, model)


@pytest.mark.parametrize("trans_b, alpha", [(1, 1.0), (0, 1.0), (1, 0.5)])
def test_a_gemm_weight_is_read_in_its_own_type_and_becomes_the_conv_weight_bit_for_bit(trans_b, alpha):
    """No float64 copy of a layer's weight unless alpha scales it (vgg16's first is 400 MB; the copy cost 0.8 GB
    and seconds: benchmarks/onnx_rewrite_speed.py)."""
    (w,) = weights((3, 36))
    model = small_model([node("Flatten", ["x"], "f"), node("Gemm", ["f", "w"], "y", transB=trans_b, alpha=alpha)],
                        {"w": w if trans_b else w.T})
    graph = read_model(model)
    gemm = next(n for n in graph.graph if n.op_type == "Gemm")
    linear = read_linear(gemm, infer_shapes(graph), graph.ir_version)
    assert linear.weight.dtype == (np.float32 if alpha == 1.0 else np.float64)
    new = checked(rewrite(model))
    (conv_weight,) = [numpy_helper.to_array(t) for t in new.graph.initializer if t.name.endswith("conv.weight")]
    np.testing.assert_array_equal(conv_weight, (alpha * w.astype(np.float64)).astype(np.float32).reshape(3, 4, 3, 3))
    same_outputs(new, model)


def test_weights_from_constant_of_shape_constant_and_identity_nodes():
    b = weights((3,))[0]
    nodes = [node("ConstantOfShape", ["wshape"], "w", value=numpy_helper.from_array(np.array([0.05], np.float32))),
             helper.make_node("Constant", [], ["b0"], name="b0", value=numpy_helper.from_array(b)),
             node("Identity", ["b0"], "b"), node("Flatten", ["x"], "f"), node("Gemm", ["f", "w", "b"], "y", transB=1)]
    model = small_model(nodes, {"wshape": np.array([3, 36])})
    new = checked(rewrite(model))
    assert census(new) == {"Conv": 1, "Flatten": 1} and not any(t.name == "wshape" for t in new.graph.initializer)
    same_outputs(new, model)


def test_squeeze_matmul_without_bias_and_a_batchnorm_between_layers():
    w1, w2 = weights((4, 6), (6, 3))
    stats = [np.linspace(0.5, 1.5, 6), np.linspace(-0.2, 0.2, 6), np.linspace(-0.1, 0.1, 6), np.linspace(0.5, 2, 6)]
    nodes = [node("GlobalAveragePool", ["x"], "g"), node("Squeeze", ["g", "axes"], "s"),
             node("MatMul", ["s", "w1"], "h"),
             node("BatchNormalization", ["h", "scale", "shift", "mean", "var"], "bn"), node("Relu", ["bn"], "r"),
             node("MatMul", ["r", "w2"], "y")]
    model = small_model(nodes, {"w1": w1, "w2": w2, "axes": np.array([2, 3]), **dict(zip(
        ("scale", "shift", "mean", "var"), stats))})
    new = checked(rewrite(model))
    assert census(new) == {"GlobalAveragePool": 1, "Conv": 2, "BatchNormalization": 1, "Relu": 1, "Flatten": 1}
    same_outputs(new, model)


def test_outputs_of_the_head_keep_their_names_and_shapes_and_dense_makes_them_maps():
    w1, b1, w2, b2 = weights((5, 36), (5,), (3, 5), (3,))
    nodes = [node("Flatten", ["x"], "f"), node("Gemm", ["f", "w1", "b1"], "h", transB=1), node("Relu", ["h"], "hidden"),
             node("Gemm", ["hidden", "w2", "b2"], "logits", transB=1), node("Softmax", ["logits"], "probs")]
    model = small_model(nodes, {"w1": w1, "b1": b1, "w2": w2, "b2": b2}, outputs=("hidden", "logits", "probs"))
    new = checked(rewrite(model))
    assert new.graph.output == model.graph.output
    assert [n.name for n in new.graph.node if n.op_type == "Relu"] == ["hidden"]  # kept, on the map
    same_outputs(new, model)
    dense = checked(rewrite(model, HeadOptions(dense=True)))
    assert [dims(o) for o in dense.graph.output] == [[1, 5, "out_height", "out_width"], [1, 3, "out_height",
                                                     "out_width"], [1, 3, "out_height", "out_width"]]
    x = np.random.default_rng(10).standard_normal((1, 4, 3, 3)).astype(np.float32)
    for a, b in zip(run(dense, x), run(model, x), strict=True):
        assert rel(a.reshape(b.shape), b) <= 1e-5


def test_dense_copies_the_ops_between_a_removed_pooling_and_its_flatten():
    w, b = weights((3, 4), (3,))
    nodes = [node("GlobalAveragePool", ["x"], "g"), node("Dropout", ["g"], "d"), node("Flatten", ["d"], "f"),
             node("Gemm", ["f", "w", "b"], "y", transB=1)]
    model = small_model(nodes, {"w": w, "b": b})
    new = checked(rewrite(model, HeadOptions(dense=True)))
    assert census(new) == {"Dropout": 1, "Conv": 1}
    (row,) = report_of(new).replaced
    assert row.detail.exactness is Exactness.SCORE_MAP_MEAN and row.out_shape == (1, 3, 3, 3)
    x = np.random.default_rng(11).standard_normal((1, 4, 3, 3)).astype(np.float32)
    assert rel(run(new, x)[0].mean(axis=(2, 3)), run(model, x)[0]) <= 1e-5


def test_dense_keeps_a_global_max_pooling_and_its_map_is_one_position_at_any_size():
    w, b = weights((3, 4), (3,))
    model = small_model([node("GlobalMaxPool", ["x"], "g"), node("Flatten", ["g"], "f"),
                         node("Gemm", ["f", "w", "b"], "y", transB=1)], {"w": w, "b": b})
    new = checked(rewrite(model, HeadOptions(dense=True)))
    (row,) = report_of(new).replaced
    assert row.exact and row.detail.removal is PoolRemoval.NONE and "GlobalMaxPool is no average: kept" in row.notes[0]
    assert dims(new.graph.input[0]) == [1, 4, "height", "width"] and dims(new.graph.output[0]) == [1, 3, 1, 1]
    x = np.random.default_rng(14).standard_normal((1, 4, 3, 3)).astype(np.float32)
    assert rel(run(new, x)[0].reshape(1, 3), run(model, x)[0]) <= 1e-5
    assert run(new, np.ones((1, 4, 7, 5), np.float32))[0].shape == (1, 3, 1, 1)


def test_two_heads_on_one_flattened_map():
    w1, w2 = weights((3, 36), (2, 36))
    nodes = [node("Flatten", ["x"], "f"), node("Gemm", ["f", "w1"], "y1", transB=1),
             node("Gemm", ["f", "w2"], "y2", transB=1)]
    model = small_model(nodes, {"w1": w1, "w2": w2}, outputs=("y1", "y2"))
    new = checked(rewrite(model))
    assert [r.name for r in report_of(new).replaced] == ["y1", "y2"] and census(new) == {"Conv": 2, "Flatten": 2}
    same_outputs(new, model)


def test_gap_collapses_a_flattened_head_and_gap_mlp_is_exact_behind_a_global_average():
    w1, b1, w2, b2 = weights((5, 36), (5,), (3, 5), (3,))
    nodes = [node("Flatten", ["x"], "f"), node("Gemm", ["f", "w1", "b1"], "h", transB=1), node("Identity", ["h"], "i"),
             node("Gemm", ["i", "w2", "b2"], "y", transB=1)]
    model = small_model(nodes, {"w1": w1, "b1": b1, "w2": w2, "b2": b2})
    new = checked(rewrite(model, HeadOptions(mode="gap")))
    rep = report_of(new)
    (row,) = rep.replaced
    assert row.detail.collapsed and row.detail.linears == ("h",) and row.detail.dropped == ("y",)
    assert row.detail.exactness is Exactness.APPROXIMATE and not row.exact
    assert row.new == "Conv(4, 3, k=1x1) -> GlobalAveragePool -> Flatten" and "fits no weights" in rep.notes[0]
    constant = np.random.default_rng(12).standard_normal((1, 4, 1, 1)).astype(np.float32) * np.ones((1, 1, 3, 3),
                                                                                                    np.float32)
    assert rel(run(new, constant)[0], run(model, constant)[0]) <= 1e-5  # exact on spatially constant maps
    dense = checked(rewrite(model, HeadOptions(mode="gap", dense=True)))
    assert census(dense) == {"Conv": 1} and rel(run(dense, constant)[0][:, :, 1, 1], run(model, constant)[0]) <= 1e-5
    pooled = tf2onnx_style_classifier(head=Head.GLOBAL_POOL_GEMM, between=Between.DROPOUT)
    for mode in ("gap", "gap_mlp"):
        new = checked(rewrite(pooled, HeadOptions(mode=mode)))
        (row,) = report_of(new).replaced
        assert row.exact and row.detail.removal is PoolRemoval.GLOBAL and row.detail.mode.value == mode
        assert row.new.startswith("Conv(16, 32, k=1x1) -> GlobalAveragePool -> Conv(32, 10, k=1x1)")
        x = nhwc(np.random.default_rng(13))
        assert rel(run(new, x)[0], run(pooled, x)[0]) <= 1e-5


def test_the_report_travels_in_the_file_and_a_second_rewrite_finds_nothing(tmp_path):
    model = tf2onnx_style_classifier(head=Head.FLATTEN_GEMM)
    write_model(rewrite_onnx(model, HeadOptions()), tmp_path / "head.onnx")
    rep = report_of(tmp_path / "head.onnx")
    record = rep.replaced[0].detail
    assert isinstance(record, HeadRecord) and record.removal is PoolRemoval.NONE and record.kernel == (4, 4)
    assert record.parameters == (256 * 32 + 32 + 32 * 10, 256 * 32 + 32 + 32 * 10)
    again = report_of(rewrite(tmp_path / "head.onnx"))
    assert len(again.passes) == 2 and again.passes[1].notes == (
        "no Gemm or MatMul node found in the graph: nothing to rewrite",)
    kept = report_of(rewrite(model, skip="*dense/MatMul"))
    assert kept.skipped[0].reason == "matched skip pattern '*dense/MatMul'"
