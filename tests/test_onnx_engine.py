"""convify.onnx.engine: the report in the model (and through a saved file), nothing to rewrite, rewriting twice,
only/skip, the source left alone, errors; and the ONNX implementations' registry."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from convify.core import registry
from convify.core.options import RewriteOptions, option
from convify.core.rewrites.maxpool import ExactTree, MaxPoolOptions, PoolParams, PoolRecord
from convify.core.spec import RewriteSpec
from convify.errors import ModelFileError, UsageError
from convify.onnx.engine import REPORT_KEY, report_of, rewrite_onnx
from convify.onnx.files import read_model, to_proto, write_model
from convify.onnx.rewrites import IMPLEMENTATIONS, implementation

from onnx_models import pool_model

EXACT = MaxPoolOptions(mode="exact")


def two_pools() -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("MaxPool", ["p1"], ["y"], name="pool2", kernel_shape=[2, 2], strides=[2, 2])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2, 2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_the_report_goes_into_the_model_and_round_trips_through_a_saved_file(tmp_path):
    model = rewrite_onnx(two_pools(), EXACT)
    rep = report_of(model)
    assert [r.name for r in rep.replaced] == ["pool1", "pool2"] and rep.exact
    write_model(model, tmp_path / "out.onnx")
    again = report_of(tmp_path / "out.onnx")
    assert again == rep == report_of(onnx.load(tmp_path / "out.onnx"))
    record = again.replaced[0].detail
    assert isinstance(record, PoolRecord) and isinstance(record.tree, ExactTree) and isinstance(record.params,
                                                                                                 PoolParams)
    assert again.passes[0].options == {"mode": "exact", "init": "avg", "exact_form": "chain", "grouped": True}
    assert again.passes[0].input_shape == (1, 2, 8, 8)
    assert json.loads(model.metadata_props[REPORT_KEY])["exact"] is True


def test_both_pools_after_a_relu_are_proven_before_either_is_rewritten():
    rep = report_of(rewrite_onnx(two_pools(), MaxPoolOptions(mode="exact", exact_form="separable")))
    assert [r.detail.tree.sign_proof for r in rep.replaced] == ["relu", "relu"]


def test_a_file_rewritten_twice_appends_its_report(tmp_path):
    write_model(rewrite_onnx(two_pools(), EXACT, only="pool1"), tmp_path / "once.onnx")
    twice = rewrite_onnx(tmp_path / "once.onnx", MaxPoolOptions(mode="conv"))
    rep = report_of(twice)
    assert len(rep.passes) == 2
    assert [r.name for r in rep.passes[0].replaced] == ["pool1"] and rep.passes[0].skipped[0].name == "pool2"
    assert [r.name for r in rep.passes[1].replaced] == ["pool2"] and not rep.exact


def test_a_model_with_nothing_to_rewrite_is_unchanged_and_its_report_says_so():
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    new = to_proto(rewrite_onnx(proto, EXACT))
    assert new.graph == proto.graph
    rep = report_of(new)
    assert not rep.replaced and not rep.skipped and rep.notes == ("no MaxPool node found in the graph: nothing to "
                                                                  "rewrite",)


def test_only_and_skip_leave_sites_with_the_reason():
    rep = report_of(rewrite_onnx(two_pools(), EXACT, skip="pool2", only=["pool*", "nothing*"]))
    assert [r.name for r in rep.replaced] == ["pool1"]
    assert rep.skipped[0].reason == "matched skip pattern 'pool2'"
    assert "pattern 'nothing*' matched no maxpool site" in rep.notes
    rep = report_of(rewrite_onnx(two_pools(), EXACT, only="pool2"))
    assert rep.skipped[0].reason == "not matched by only=['pool2']"


def test_an_ir_model_given_is_not_changed():
    model = read_model(two_pools())
    before = to_proto(model).SerializeToString()
    rewritten = rewrite_onnx(model, EXACT)
    assert to_proto(model).SerializeToString() == before and REPORT_KEY not in model.metadata_props
    assert rewritten is not model and "MaxPool" not in {n.op_type for n in rewritten.graph}


@dataclass(frozen=True)
class ToyOptions(RewriteOptions):
    mode: str = option("on", "a rewrite the ONNX frontend does not implement", choices=("on",))


def test_a_rewrite_with_no_onnx_implementation_and_wrong_options_are_refused():
    registry.register(RewriteSpec(name="toy_unimplemented", Options=ToyOptions, keyword="toy_unimplemented"))
    try:
        with pytest.raises(UsageError, match="rewrite 'toy_unimplemented' has no ONNX implementation yet; "
                                             "implemented for ONNX: head, maxpool"):
            rewrite_onnx(two_pools(), [EXACT, ToyOptions()])
    finally:
        registry.unregister("toy_unimplemented")
    with pytest.raises(UsageError, match="takes rewrite options"):
        rewrite_onnx(two_pools(), ["exact"])
    with pytest.raises(UsageError, match="at least one rewrite"):
        rewrite_onnx(two_pools(), [])
    assert implementation("maxpool") is IMPLEMENTATIONS["maxpool"]


def test_a_bad_report_in_the_metadata_and_a_bad_file_are_one_line(tmp_path):
    proto = two_pools()
    proto.metadata_props.add(key=REPORT_KEY, value="{not json")
    with pytest.raises(ModelFileError, match="its metadata 'convify.report' is no convify report"):
        report_of(proto)
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(ModelFileError, match="junk.onnx is not an ONNX model"):
        report_of(tmp_path / "junk.onnx")
    with pytest.raises(ModelFileError, match="no such file"):
        rewrite_onnx(tmp_path / "missing.onnx", EXACT)
    assert report_of(pool_model([1, 1, 4, 4], kernel_shape=[2, 2])).passes == ()


def test_the_rewritten_model_computes_what_the_original_did():
    from onnx_models import rel, run

    proto = two_pools()
    new = to_proto(rewrite_onnx(proto, EXACT))
    onnx.checker.check_model(new, full_check=True)
    x = np.random.default_rng(0).standard_normal((1, 2, 8, 8)).astype(np.float32)
    assert rel(run(new, x)[0], run(proto, x)[0]) <= 1e-6
