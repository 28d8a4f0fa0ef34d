"""ONNX files nobody here wrote, rewritten whole (``pool="exact"``, ``head="conv"``) and
verified in onnxruntime: torchvision classifiers exported by both of torch's
exporters (re-initialized, input-dependent weights) and the Caffe2 graphs of
onnx's own test data given random weights."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import convify

from onnx_material import WeightDelivery, light_with_random_weights, light_zoo, torchvision_export

#: (model, exporter): the cheap ones to export (tests/onnx_material.py times them)
EXPORTS = [("resnet18", "legacy"), ("resnet18", "dynamo"), ("squeezenet1_1", "legacy"), ("squeezenet1_1", "dynamo"),
           pytest.param("googlenet", "legacy", marks=pytest.mark.slow),
           pytest.param("densenet121", "dynamo", marks=pytest.mark.slow)]
MAX_OPS = ("MaxPool", "Max", "ReduceMax", "TopK", "ArgMax")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("zoo")


def assert_exact_in_onnxruntime(original, rewritten, heads: int) -> None:
    v = convify.verify(original, rewritten)
    assert v.passed and v.equivalence.exact and v.equivalence.rel <= 1e-5, str(v)
    assert not [op for op in MAX_OPS if v.census_rewritten.get(op)], v.census_rewritten
    assert v.census_rewritten.get("Gemm", 0) + v.census_rewritten.get("MatMul", 0) == 0 or heads == 0
    assert all(c.passed for c in v.checks)


@pytest.mark.parametrize("name,exporter", EXPORTS)
def test_torchvision_exports_rewritten_exactly(folder, name, exporter):
    path = torchvision_export(name, exporter, folder)
    out = convify.convify(path, pool="exact", head="conv")
    rep = convify.report(out)
    pools = sum(n.op_type == "MaxPool" for n in onnx.load(path, load_external_data=False).graph.node)
    assert len([r for r in rep.replaced if r.rewrite == "maxpool"]) == pools > 0
    assert rep.exact and not [s for s in rep.skipped if s.rewrite == "maxpool"]
    heads = len([r for r in rep.replaced if r.rewrite == "head"])
    assert heads == (0 if name == "squeezenet1_1" else 1)  # squeezenet ends in a convolution
    onnx.checker.check_model(out, full_check=True)
    assert [i.name for i in out.graph.input] == ["input"] and [o.name for o in out.graph.output] == ["logits"]
    assert_exact_in_onnxruntime(path, out, heads)


@pytest.mark.parametrize("name", ["light_squeezenet", "light_bvlc_alexnet",
                                  pytest.param("light_inception_v1", marks=pytest.mark.slow)])
@pytest.mark.parametrize("delivery", list(WeightDelivery))
def test_caffe2_graphs_with_random_weights(name, delivery):
    path = next(p for p in light_zoo() if p.stem == name)
    model = light_with_random_weights(path, np.random.default_rng(0), delivery)
    out = convify.convify(model, pool="exact", head="conv")
    rep = convify.report(out)
    assert rep.replaced and rep.exact and not [s for s in rep.skipped if s.rewrite == "maxpool"]
    onnx.checker.check_model(out, full_check=True)
    assert out.ir_version == model.ir_version == 3  # initializers stay graph inputs too
    assert_exact_in_onnxruntime(model, out, len([r for r in rep.replaced if r.rewrite == "head"]))


def test_a_rewrite_of_a_file_with_external_data_stands_alone(folder, tmp_path):
    """The returned proto holds the weights the source kept beside it: saved anywhere, it runs."""
    path = torchvision_export("squeezenet1_1", "dynamo", folder)
    assert Path(str(path) + ".data").exists()
    out = convify.replace_maxpool(path, mode="exact")
    elsewhere = tmp_path / "elsewhere" / "exact.onnx"
    elsewhere.parent.mkdir()
    onnx.save(out, elsewhere)
    assert list(elsewhere.parent.iterdir()) == [elsewhere]
    assert convify.verify(path, elsewhere).passed
