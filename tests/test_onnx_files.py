"""convify.onnx.files: reading (one clear line for bad input), writing (external data), protos."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from convify.cli.command import EXIT_USAGE
from convify.cli.errors import classify
from convify.errors import CheckpointError, ModelFileError
from convify.onnx.files import has_external_data, read_model, to_proto, write_model

from onnx_models import pool_model


def conv_model(channels: int = 4) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.random.RandomState(0).randn(channels, 3, 3, 3).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 6, 6])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_a_file_reads_back_as_it_was_written(tmp_path):
    proto = pool_model([1, 3, 8, 8], kernel_shape=[2, 2])
    onnx.save(proto, tmp_path / "m.onnx")
    model = read_model(tmp_path / "m.onnx")
    assert isinstance(model, ir.Model)
    assert to_proto(model) == proto
    assert read_model(proto).graph.node(0).op_type == "MaxPool"
    assert read_model(model) is model


@pytest.mark.parametrize("content, match", [
    (b"", r"m\.onnx is empty, not an ONNX model"),
    (b"hello, this is no model\n", r"m\.onnx is not an ONNX model, or is truncated \(DecodeError"),
    ("half", r"m\.onnx is not an ONNX model, or is truncated"),
])
def test_bad_files_give_one_line(tmp_path, content, match):
    path = tmp_path / "m.onnx"
    if content == "half":
        content = conv_model().SerializeToString()
        content = content[:len(content) // 2]
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=match) as info:
        read_model(path)
    assert "\n" not in str(info.value)


def test_a_model_the_checker_rejects_is_named_with_the_checkers_first_line(tmp_path):
    bad = conv_model()
    bad.graph.node[0].input[1] = "missing"
    onnx.save(bad, tmp_path / "bad.onnx")
    with pytest.raises(ModelFileError, match=r"bad\.onnx: the ONNX checker rejects it: .*missing") as info:
        read_model(tmp_path / "bad.onnx")
    assert "\n" not in str(info.value)
    with pytest.raises(ModelFileError, match="the ONNX model given: the ONNX checker rejects it"):
        read_model(bad)


def test_a_missing_file_and_a_wrong_type(tmp_path):
    with pytest.raises(ModelFileError, match=r"nope\.onnx: no such file"):
        read_model(tmp_path / "nope.onnx")
    with pytest.raises(ModelFileError, match="expected a path, an onnx.ModelProto or an onnx_ir.Model, got int"):
        read_model(3)


def test_the_command_line_exits_2_on_a_bad_model_file(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"garbage")
    with pytest.raises(ModelFileError) as info:
        read_model(tmp_path / "m.onnx")
    assert isinstance(info.value, CheckpointError)
    code, line = classify(info.value)
    assert code == EXIT_USAGE == 2 and "\n" not in line


def test_external_data_is_kept_external_and_small_models_stay_inside(tmp_path):
    proto = conv_model(channels=64)
    weight = numpy_helper.to_array(proto.graph.initializer[0])
    onnx.save(proto, tmp_path / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=0)
    model = read_model(tmp_path / "ext.onnx")
    assert has_external_data(model)
    out = tmp_path / "out" / "copy.onnx"
    out.parent.mkdir()
    assert write_model(model, out) == out.with_name("copy.onnx.data")
    assert (out.parent / "copy.onnx.data").stat().st_size > 0
    again = read_model(out)
    assert has_external_data(again)
    np.testing.assert_array_equal(again.graph.initializers["w"].const_value.numpy(), weight)
    # inside: no data file
    assert write_model(read_model(conv_model()), tmp_path / "inside.onnx") is None
    assert not (tmp_path / "inside.onnx.data").exists()
    assert not has_external_data(read_model(tmp_path / "inside.onnx"))


def test_rewriting_a_file_with_external_data_in_place_keeps_its_weights(tmp_path):
    proto = conv_model(channels=64)
    weight = numpy_helper.to_array(proto.graph.initializer[0])
    path = tmp_path / "m.onnx"
    onnx.save(proto, path, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    model = read_model(path)
    write_model(model, path)  # the data file it reads from is the one written
    np.testing.assert_array_equal(read_model(path).graph.initializers["w"].const_value.numpy(), weight)
