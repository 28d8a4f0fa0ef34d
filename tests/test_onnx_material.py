"""The ONNX test material of tests/onnx_material.py: every graph passes the checker,
runs in onnxruntime, has outputs that depend on its input, and is what its docstring says."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from onnx_material import (EXPORT_SIZES, BackendCase, Between, Head, WeightDelivery, check_model, data_inputs,
                           input_dependence, light_with_random_weights, light_zoo, maxpool_backend_cases, ort_session,
                           random_feeds, run_onnx, softmax_input, tf2onnx_style_classifier, torchvision_export,
                           torchvision_model, vnncomp_style_cnn, vnncomp_style_torch, vnncomp_style_torch_export,
                           with_outputs)

MIN_DEPENDENCE = 1e-3


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def two_runs(model: onnx.ModelProto | Path, feeds_model: onnx.ModelProto, seed: int = 1) -> tuple[list, list]:
    """All outputs for two random inputs."""
    session = ort_session(model)
    rng = np.random.default_rng(seed)
    return session.run(None, random_feeds(feeds_model, rng)), session.run(None, random_feeds(feeds_model, rng))


# ---------------------------------------------------------------- torchvision exports

@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``exported(name, exporter, zero_biases=False)``: a torchvision export, made once per session."""
    folder = tmp_path_factory.mktemp("torchvision_onnx")
    made: dict[tuple[str, str, bool], Path] = {}

    def get(name: str, exporter: str, zero_biases: bool = False) -> Path:
        key = (name, exporter, zero_biases)
        if key not in made:
            made[key] = torchvision_export(name, exporter, folder, zero_biases=zero_biases)
        return made[key]

    return get


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_torchvision_export_runs_like_the_torch_model(exported, exporter):
    path = exported("resnet18", exporter)
    check_model(path)
    size = EXPORT_SIZES["resnet18"]
    x = torch.randn(2, 1, 3, size, size)
    model = torchvision_model("resnet18")
    with torch.no_grad():
        want = [model(xi).numpy() for xi in x]
    session = ort_session(path)
    got = [session.run(None, {"input": xi.numpy()})[0] for xi in x]
    for g, w in zip(got, want):
        assert np.abs(g - w).max() / np.abs(w).max() < 1e-4
    assert input_dependence(*got) > MIN_DEPENDENCE


def test_dynamo_export_has_external_data_and_a_reduce_mean_head(exported):
    path = exported("resnet18", "dynamo")
    assert path.with_name(path.name + ".data").is_file()
    model = onnx.load(str(path), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(e.value == path.name + ".data" for t in external for e in t.external_data
                            if e.key == "location")
    assert op_types(model)[-3:] == ["ReduceMean", "Reshape", "Gemm"]
    assert "BatchNormalization" not in op_types(model)  # folded into the Convs
    assert model.ir_version == 10


def test_legacy_export_is_one_file_with_a_global_pool_flatten_gemm_head(exported):
    path = exported("resnet18", "legacy")
    assert [p.name for p in path.parent.glob(path.name + "*")] == [path.name]
    model = onnx.load(str(path), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in model.graph.initializer)
    assert op_types(model)[-3:] == ["GlobalAveragePool", "Flatten", "Gemm"]
    assert "BatchNormalization" not in op_types(model)
    assert model.ir_version == 9


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_zero_biases_are_shared_by_identity_nodes_or_dropped(exported, exporter):
    path = exported("squeezenet1_1", exporter, zero_biases=True)
    model = onnx.load(str(path), load_external_data=False)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    identities = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity"}
    weights = {t.name for t in model.graph.initializer}
    if exporter == "dynamo":
        assert not identities and all(len(c.input) == 2 for c in convs)
    else:  # one zero bias of each length kept, the others Identity nodes of it
        assert identities and set(identities.values()) <= weights
        assert all(len(c.input) == 3 and c.input[2] in weights | set(identities) for c in convs)
        shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
        lengths = {shapes[identities.get(c.input[2], c.input[2])] for c in convs}
        assert len(identities) == len(convs) - len(lengths)
    x = torch.randn(1, 3, EXPORT_SIZES["squeezenet1_1"], EXPORT_SIZES["squeezenet1_1"])
    with torch.no_grad():
        want = torchvision_model("squeezenet1_1", zero_biases=True)(x).numpy()
    got = run_onnx(path, {"input": x.numpy()})[0]
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4


def test_torchvision_export_refuses_an_unknown_exporter_or_model(tmp_path):
    with pytest.raises(ValueError, match="exporter must be one of"):
        torchvision_export("resnet18", "torchscript", tmp_path)
    with pytest.raises(ValueError, match="no export size for 'resnet50'"):
        torchvision_export("resnet50", "legacy", tmp_path)


# ---------------------------------------------------------------- onnx's light models

LIGHT = {p.stem.removeprefix("light_"): p for p in light_zoo()}
# alexnet, vgg19 and zfnet512 pass too, but cost 4 to 11 s each (61 to 143 M weights).
CHEAP_LIGHT = ["squeezenet", "shufflenet", "inception_v1", "inception_v2", "resnet50", "densenet121"]


def test_light_zoo_is_the_nine_caffe2_graphs():
    assert sorted(LIGHT) == ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50",
                             "shufflenet", "squeezenet", "vgg19", "zfnet512"]
    for path in LIGHT.values():
        model = onnx.load(str(path))
        assert (model.ir_version, model.opset_import[0].version) == (3, 9)
        assert list(data_inputs(model).values()) == [(1, 3, 224, 224)]
        assert "ConstantOfShape" in op_types(model)


def non_constant(values: np.ndarray) -> bool:
    return values.size == 1 or float(np.ptp(values)) > 0


@pytest.mark.parametrize("name", CHEAP_LIGHT)
def test_light_model_with_random_weights(name):
    variants = {d: light_with_random_weights(LIGHT[name], np.random.default_rng(0), d) for d in WeightDelivery}
    outputs = {}
    for delivery, model in variants.items():
        assert "ConstantOfShape" not in op_types(model)
        assert model.ir_version == 3
        assert {t.name for t in model.graph.initializer} <= {i.name for i in model.graph.input}
        weights = [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
        weights += [numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.op_type == "Constant"]
        assert all(non_constant(w) for w in weights)
        check_model(model)
        logits = softmax_input(model)
        probed = with_outputs(model, [logits]) if logits else model
        first, second = two_runs(probed, model)
        for a, b in zip(first, second):  # the graph's output (a Softmax's, mostly) and its logits
            assert input_dependence(a, b) > MIN_DEPENDENCE
        outputs[delivery] = first
    counts = Counter(op_types(variants[WeightDelivery.NODES]))
    assert counts["Constant"] > 0 and counts["Identity"] > 0
    for a, b in zip(*outputs.values()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())


def test_light_weights_follow_the_seed():
    path = LIGHT["squeezenet"]
    a, b, c = (light_with_random_weights(path, np.random.default_rng(s)) for s in (0, 0, 1))
    assert a.SerializeToString() == b.SerializeToString() != c.SerializeToString()


# ---------------------------------------------------------------- onnx's MaxPool node tests

CASES = maxpool_backend_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_maxpool_backend_case_runs_in_onnxruntime(case: BackendCase):
    check_model(case.model)
    feeds = {i.name: x for i, x in zip(case.model.graph.input, case.inputs)}
    for got, want in zip(run_onnx(case.model, feeds), case.outputs, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-7)


def test_maxpool_backend_cases_cover_what_a_frontend_meets():
    assert len(CASES) >= 19
    assert all(case.node.op_type == "MaxPool" for case in CASES)
    assert {case.spatial_rank for case in CASES} == {1, 2, 3}
    assert any(case.has_indices for case in CASES)
    assert any(case.integer_input for case in CASES)
    assert {case.auto_pad for case in CASES} >= {"NOTSET", "SAME_UPPER", "SAME_LOWER"}
    assert any(case.ceil_mode for case in CASES) and any(case.dilated for case in CASES)
    assert any(case.asymmetric_pads for case in CASES)


@pytest.mark.parametrize("case", [c for c in CASES if c.auto_pad != "NOTSET"], ids=lambda c: c.name)
def test_effective_pads_are_what_auto_pad_means(case: BackendCase):
    explicit = onnx.ModelProto()
    explicit.CopyFrom(case.model)
    node = explicit.graph.node[0]
    kept = [a for a in node.attribute if a.name != "auto_pad"]
    del node.attribute[:]
    node.attribute.extend([*kept, helper.make_attribute("pads", list(case.effective_pads))])
    feeds = {i.name: x for i, x in zip(case.model.graph.input, case.inputs)}
    np.testing.assert_array_equal(run_onnx(explicit, feeds)[0], case.outputs[0])


# ---------------------------------------------------------------- tf2onnx-style graphs

VARIANTS = {
    Head.RESHAPE_MATMUL: [{}, {"computed_shape": True}, {"bias_left": True}, {"between": Between.DROPOUT},
                          {"between": Between.IDENTITY, "computed_shape": True, "bias_left": True}],
    Head.FLATTEN_GEMM: [{}, {"between": Between.IDENTITY}],
    Head.GLOBAL_POOL_GEMM: [{}, {"between": Between.DROPOUT}],
    Head.REDUCE_MEAN_GEMM: [{}, {"keepdims": False}, {"between": Between.IDENTITY}],
}


@pytest.mark.parametrize("opset", [13, 17, 18])
@pytest.mark.parametrize("head", list(Head))
def test_tf2onnx_style_variants_are_valid_and_agree(head, opset):
    x = np.random.default_rng(3).standard_normal((2, 1, 16, 16, 3), dtype=np.float32)
    outputs = []
    for options in VARIANTS[head]:
        model = tf2onnx_style_classifier(head=head, opset=opset, **options)
        check_model(model)
        assert data_inputs(model) == {"input_1": (1, 16, 16, 3)}
        session = ort_session(model)
        first, second = (session.run(None, {"input_1": xi})[0] for xi in x)
        assert input_dependence(first, second) > MIN_DEPENDENCE
        outputs.append(first)
    for other in outputs[1:]:
        np.testing.assert_allclose(other, outputs[0], rtol=1e-5, atol=1e-7)


def test_tf2onnx_style_graph_shape():
    model = tf2onnx_style_classifier(computed_shape=True, bias_left=True)
    nodes = model.graph.node
    assert nodes[0].op_type == "Transpose" and list(nodes[0].attribute[0].ints) == [0, 3, 1, 2]
    pools = [n for n in nodes if n.op_type == "MaxPool"]
    assert {a.name: helper.get_attribute_value(a) for a in pools[0].attribute}["auto_pad"] == b"SAME_UPPER"
    assert "auto_pad" not in {a.name for a in pools[1].attribute}
    assert {"Shape", "Gather", "Unsqueeze", "Concat", "MatMul"} <= set(op_types(model))
    weights = {t.name for t in model.graph.initializer}
    assert all(n.input[0] in weights for n in nodes if n.op_type == "Add")
    assert op_types(model)[-1] == "Softmax"
    assert op_types(tf2onnx_style_classifier(softmax=False))[-1] == "Add"


@pytest.mark.parametrize("opset,axes_as", [(13, "attribute"), (17, "attribute"), (18, "input")])
def test_reduce_mean_axes_follow_the_opset(opset, axes_as):
    model = tf2onnx_style_classifier(head=Head.REDUCE_MEAN_GEMM, opset=opset, keepdims=False)
    (node,) = [n for n in model.graph.node if n.op_type == "ReduceMean"]
    has_axes_attribute = any(a.name == "axes" for a in node.attribute)
    assert (has_axes_attribute, len(node.input)) == ((True, 1) if axes_as == "attribute" else (False, 2))


def test_flatten_gemm_head_has_scaled_gemms_and_one_without_bias():
    gemms = [n for n in tf2onnx_style_classifier(head=Head.FLATTEN_GEMM).graph.node if n.op_type == "Gemm"]
    attributes = [{a.name: helper.get_attribute_value(a) for a in g.attribute} for g in gemms]
    assert [len(g.input) for g in gemms] == [3, 2]
    assert all(a["transB"] == 1 and a["alpha"] != 1 for a in attributes) and attributes[0]["beta"] != 1


def test_global_pool_and_reduce_mean_heads_compute_the_same():
    x = {"input_1": np.random.default_rng(4).standard_normal((1, 16, 16, 3), dtype=np.float32)}
    pooled = run_onnx(tf2onnx_style_classifier(head=Head.GLOBAL_POOL_GEMM, opset=18), x)[0]
    reduced = run_onnx(tf2onnx_style_classifier(head=Head.REDUCE_MEAN_GEMM, opset=13), x)[0]
    np.testing.assert_allclose(pooled, reduced, rtol=1e-5, atol=1e-7)


def test_tf2onnx_style_refuses_options_its_head_lacks():
    with pytest.raises(ValueError, match="apply to Head.RESHAPE_MATMUL only"):
        tf2onnx_style_classifier(head=Head.FLATTEN_GEMM, computed_shape=True)
    with pytest.raises(ValueError, match="keepdims applies to Head.REDUCE_MEAN_GEMM only"):
        tf2onnx_style_classifier(keepdims=False)


# ---------------------------------------------------------------- the VNN-COMP-like CNN

@pytest.mark.parametrize("in_channels,size", [(1, 28), (3, 32)])
def test_vnncomp_style_cnn_is_the_torch_network(in_channels, size):
    model = vnncomp_style_cnn(in_channels=in_channels, size=size)
    check_model(model)
    assert op_types(model) == ["Conv", "Relu", "MaxPool", "Conv", "Relu", "MaxPool", "Flatten", "Gemm", "Relu", "Gemm"]
    x = np.random.default_rng(5).standard_normal((2, 1, in_channels, size, size), dtype=np.float32)
    session = ort_session(model)
    got = [session.run(None, {"input": xi})[0] for xi in x]
    with torch.no_grad():
        want = [vnncomp_style_torch(in_channels=in_channels, size=size)(torch.from_numpy(xi)).numpy() for xi in x]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())
    assert input_dependence(*got) > MIN_DEPENDENCE


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_vnncomp_style_torch_export_matches_the_helper_graph(tmp_path, exporter):
    path = vnncomp_style_torch_export(tmp_path, exporter=exporter)
    check_model(path)
    exported = onnx.load(str(path), load_external_data=False)
    assert set(op_types(exported)) <= {"Conv", "Relu", "MaxPool", "Flatten", "Reshape", "Gemm"}
    x = {"input": np.random.default_rng(6).standard_normal((1, 1, 28, 28), dtype=np.float32)}
    np.testing.assert_allclose(run_onnx(path, x)[0], run_onnx(vnncomp_style_cnn(), x)[0], rtol=1e-5, atol=1e-5)
