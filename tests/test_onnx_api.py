"""The entry points on ONNX models: ``convify.replace_maxpool``, ``convify.convify``,
``convify.report`` and ``convify.verify`` take a ``.onnx`` path, an
``onnx.ModelProto`` or an ``onnx_ir.Model`` and answer in ONNX."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import convify
from convify.errors import ModelFileError, UsageError, VerificationError
from convify.onnx.detect import is_onnx

from onnx_material import run_onnx, vnncomp_style_cnn, vnncomp_style_torch


@pytest.fixture(scope="module")
def original() -> onnx.ModelProto:
    return vnncomp_style_cnn()


def feeds(model: onnx.ModelProto, n: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    name = model.graph.input[0].name
    return {name: np.random.default_rng(seed).standard_normal((n, 1, 28, 28)).astype(np.float32)}


def test_is_onnx_tells_models_without_importing_for_others(tmp_path, original):
    import onnx_ir as ir
    assert is_onnx(original) and is_onnx(ir.from_proto(original)) and is_onnx(tmp_path / "m.ONNX")
    assert not is_onnx("model.pt") and not is_onnx(torch.nn.Linear(1, 1)) and not is_onnx(None)


def test_replace_maxpool_on_a_proto_and_a_path_returns_a_proto_carrying_its_report(tmp_path, original):
    path = tmp_path / "vnn.onnx"
    onnx.save(original, path)
    for source in (original, path, str(path)):
        out = convify.replace_maxpool(source, mode="exact", exact_form="separable", grouped=False)
        assert isinstance(out, onnx.ModelProto)
        rep = convify.report(out)
        assert rep.exact and [r.name for r in rep.replaced] == ["pool1", "pool2"]
        assert not [n for n in out.graph.node if n.op_type in ("MaxPool", "Add")]
        assert all(a.i == 1 for n in out.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group")
        x = feeds(original, 1, seed=3)
        want, got = run_onnx(original, x)[0], run_onnx(out, x)[0]
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    onnx.save(out, tmp_path / "exact.onnx")
    assert convify.report(tmp_path / "exact.onnx").exact  # the saved file keeps the report
    assert not convify.report(original).passes  # the original is untouched
    assert [n.op_type for n in original.graph.node].count("MaxPool") == 2


def test_convify_on_onnx_applies_the_chosen_rewrites(original):
    out = convify.convify(original, pool="conv", head=None)
    rep = convify.report(out)
    assert [p.rewrite for p in rep.passes] == ["maxpool"] and not rep.exact
    assert rep.passes[0].options == {"mode": "conv", "init": "avg"}
    with pytest.raises(UsageError, match="nothing to do"):
        convify.convify(original, pool=None, head=None)


def test_torch_only_arguments_are_refused_by_name(original):
    with pytest.raises(UsageError, match=r"replace_maxpool: example_input, inplace apply to PyTorch models only"):
        convify.replace_maxpool(original, torch.zeros(1, 1, 28, 28), mode="exact", inplace=True)
    with pytest.raises(UsageError, match=r"convify: calibration applies to PyTorch models only"):
        convify.convify(original, pool="exact", calibration=[torch.zeros(1, 1, 28, 28)])


def test_a_file_that_is_not_onnx_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(ModelFileError, match="bad.onnx"):
        convify.replace_maxpool(bad, mode="exact")


def test_verify_two_onnx_models_in_onnxruntime(original):
    exact = convify.replace_maxpool(original, mode="exact")
    v = convify.verify(original, exact)
    assert v.passed and v.fidelity is None and v.equivalence.exact and v.equivalence.rel <= 1e-5
    assert v.input_shapes == ((8, 1, 28, 28),) and v.session_providers[0] == "CPUExecutionProvider"
    assert [c.passed for c in v.checks] == [True, True] and v.census_rewritten.get("MaxPool", 0) == 0
    assert "not applicable (ONNX models: nothing exported)" in str(v) and "ONNX models as given" in str(v)
    assert v.to_dict()["fidelity"] is None


def test_verify_judges_an_approximate_onnx_rewrite_by_agreement_only(original):
    conv = convify.replace_maxpool(original)
    v = convify.verify(original, conv)
    assert v.passed and v.equivalence.passed is None and v.equivalence.top1_agreement is not None
    assert not convify.verify(original, conv, min_agreement=1.01).passed


def test_verify_catches_a_pool_left_in_place_and_wrong_numbers(original):
    partial = convify.replace_maxpool(original, mode="exact", skip="pool2")
    v = convify.verify(original, partial)
    assert v.equivalence.passed and v.census_rewritten["MaxPool"] == 1 and v.passed  # it claims one site only
    broken = onnx.ModelProto()
    broken.CopyFrom(convify.replace_maxpool(original, mode="exact"))
    weight = next(i for i in broken.graph.initializer if i.name.startswith("pool1/exact"))
    array = onnx.numpy_helper.to_array(weight).copy()
    array.flat[0] += 1.0
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    v = convify.verify(original, broken)
    assert not v.passed and v.equivalence.passed is False


def test_verify_a_pytorch_original_against_an_onnx_rewrite(tmp_path, original):
    exact = convify.replace_maxpool(original, mode="exact")
    path = tmp_path / "exact.onnx"
    onnx.save(exact, path)
    v = convify.verify(vnncomp_style_torch(), path)
    assert v.passed and v.fidelity is not None and v.fidelity.passed and v.equivalence.exact


def test_verify_on_given_inputs_and_the_error_without_sizes(original):
    x = np.random.default_rng(1).standard_normal((1, 1, 28, 28)).astype(np.float32)
    v = convify.verify(original, convify.replace_maxpool(original, mode="exact"), inputs=[x, x * 2])
    assert v.passed and v.inputs_source == "given" and v.input_shapes == ((2, 1, 28, 28),)
    dynamic = onnx.ModelProto()
    dynamic.CopyFrom(original)
    dynamic.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"
    with pytest.raises(VerificationError, match=r"no size along axis 2 \('height'\): give inputs="):
        convify.verify(dynamic, dynamic)


def test_nodes_of_unknown_domains_are_kept_as_they_were():
    from onnx import TensorProto, helper
    custom = helper.make_node("Brighten", ["x"], ["b"], name="vendor_op", domain="com.example", gain=2.0)
    nodes = [custom, helper.make_node("Relu", ["b"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["y"], name="pool", kernel_shape=[2, 2], strides=[2, 2])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])],
                              value_info=[helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 3, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.example", 1)])
    out = convify.replace_maxpool(model, mode="exact")
    assert convify.report(out).exact and [r.name for r in convify.report(out).replaced] == ["pool"]
    assert out.graph.node[0] == custom and out.graph.node[1] == nodes[1]
    assert {(o.domain, o.version) for o in out.opset_import} == {("", 17), ("com.example", 1)}
    assert "MaxPool" not in {n.op_type for n in out.graph.node}
