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
from convify.onnx.files import EmbeddedTensor, has_external_data, read_model, to_proto, write_model

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
    (b"hello, this is no model\n", r"m\.onnx is not an ONNX model, or is truncated \(WireError: wire type 4"),
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


# --------------------------------------------------------------------------- weights left in the file, streamed out


def head_model(features: int = 2048, classes: int = 64) -> onnx.ModelProto:
    """x (1, 8, 16, 16) -> Flatten -> Gemm(transB=1) -> y: a head whose weight (512 KiB) a rewrite only reshapes."""
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((classes, features)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32), "b")
    nodes = [helper.make_node("Flatten", ["x"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w", "b"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, classes])], [w, b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def defer_small(monkeypatch):
    """Every initializer of 64 bytes or more stays in the file read and is streamed when written."""
    import convify.onnx.files as files  # noqa: PLC0415

    monkeypatch.setattr(files, "DEFER_FROM", 64)


def test_large_weights_stay_in_the_file_and_write_back_byte_for_byte(tmp_path, defer_small):
    proto = head_model()
    onnx.save(proto, tmp_path / "m.onnx")
    model = read_model(tmp_path / "m.onnx")
    w = model.graph.initializers["w"].const_value
    assert isinstance(w, EmbeddedTensor) and not has_external_data(model)
    np.testing.assert_array_equal(w.numpy(), numpy_helper.to_array(proto.graph.initializer[0]))
    assert write_model(model, tmp_path / "out.onnx") is None
    assert (tmp_path / "out.onnx").read_bytes() == (tmp_path / "m.onnx").read_bytes()
    assert to_proto(model) == proto  # a proto stands alone: the weights copied in, no reference to the file
    assert not any(t.external_data for t in to_proto(model).graph.initializer)


def test_a_reshaped_weight_is_written_from_the_file_and_the_bytes_are_those_of_an_in_memory_rewrite(tmp_path,
                                                                                                   monkeypatch):
    import convify.onnx.files as files  # noqa: PLC0415
    from convify.core.rewrites.head import HeadOptions  # noqa: PLC0415
    from convify.onnx import rewrite_onnx  # noqa: PLC0415

    onnx.save(head_model(), tmp_path / "m.onnx")
    written = {}
    for defer in (64, 2**40):
        monkeypatch.setattr(files, "DEFER_FROM", defer)
        model = rewrite_onnx(tmp_path / "m.onnx", HeadOptions(mode="conv"))
        weight = model.graph.initializers["fc/conv.weight"].const_value
        assert isinstance(weight, EmbeddedTensor) == (defer == 64)  # the Gemm's bytes, a range of m.onnx
        assert weight.shape == ir.Shape([64, 8, 16, 16])
        write_model(model, tmp_path / f"out{defer}.onnx")
        written[defer] = (tmp_path / f"out{defer}.onnx").read_bytes()
    assert written[64] == written[2**40]
    onnx.checker.check_model(str(tmp_path / "out64.onnx"), full_check=True)


def test_writing_over_the_file_read_keeps_the_models_weights(tmp_path, defer_small):
    proto = head_model()
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    model = read_model(path)
    model.graph.node(0).name = "renamed"  # the graph changes, so the weights move in the file
    model.graph.name = "a longer graph name than before"
    write_model(model, path)
    again = read_model(path)
    for tensor in proto.graph.initializer:
        expected = numpy_helper.to_array(tensor)
        np.testing.assert_array_equal(model.graph.initializers[tensor.name].const_value.numpy(), expected)
        np.testing.assert_array_equal(again.graph.initializers[tensor.name].const_value.numpy(), expected)
    assert again.graph.node(0).name == "renamed"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary file left


def test_a_file_cut_inside_a_weight_is_truncated(tmp_path, defer_small):
    data = head_model().SerializeToString()
    (tmp_path / "m.onnx").write_bytes(data[:len(data) // 2])
    with pytest.raises(ModelFileError, match=r"m\.onnx is not an ONNX model, or is truncated \(WireError: .*past"):
        read_model(tmp_path / "m.onnx")


def test_a_weight_of_the_wrong_size_is_the_checkers_line(tmp_path, defer_small):
    proto = head_model()
    proto.graph.initializer[0].raw_data = proto.graph.initializer[0].raw_data[:-4]
    onnx.save(proto, tmp_path / "m.onnx")
    with pytest.raises(ModelFileError, match=r"the ONNX checker rejects it: TensorProto \(tensor name: w\) raw_data "
                                             r"size \(\d+ bytes\) is too small"):
        read_model(tmp_path / "m.onnx")


def test_a_file_written_gets_the_usual_mode_or_keeps_its_own(tmp_path, defer_small):
    import os  # noqa: PLC0415

    model = read_model(head_model())
    umask = os.umask(0o022)
    try:
        write_model(model, tmp_path / "new.onnx")
        assert (tmp_path / "new.onnx").stat().st_mode & 0o777 == 0o644
        (tmp_path / "old.onnx").write_bytes(b"")
        (tmp_path / "old.onnx").chmod(0o600)
        write_model(model, tmp_path / "old.onnx")
        assert (tmp_path / "old.onnx").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(umask)


def test_a_model_read_through_a_symlink_reads_its_weights(tmp_path, defer_small):
    (tmp_path / "real").mkdir()
    (tmp_path / "links").mkdir()
    proto = head_model()
    onnx.save(proto, tmp_path / "real" / "m.onnx")
    (tmp_path / "links" / "m.onnx").symlink_to(tmp_path / "real" / "m.onnx")
    model = read_model(tmp_path / "links" / "m.onnx")
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(),
                                  numpy_helper.to_array(proto.graph.initializer[0]))
    model.graph.name = "a longer name, so that the weights move"
    write_model(model, tmp_path / "links" / "m.onnx")  # through the link, as open() writes: the link stays
    assert (tmp_path / "links" / "m.onnx").is_symlink()
    again = read_model(tmp_path / "real" / "m.onnx")
    assert again.graph.name == "a longer name, so that the weights move"
    np.testing.assert_array_equal(again.graph.initializers["w"].const_value.numpy(),
                                  numpy_helper.to_array(proto.graph.initializer[0]))


def test_a_small_view_of_a_weight_left_in_the_file_is_written_inside_the_new_file(tmp_path):
    """A new initializer that is a view of part of a mapped weight is a range of the file read, whatever its
    size; the file written holds its bytes, never a reference to the file read."""
    import convify.onnx.files as files  # noqa: PLC0415
    from convify.onnx.building import GraphEditor  # noqa: PLC0415

    big = np.arange(2**19, dtype=np.float32)
    raw = numpy_helper.from_array(big, "big")
    proto = head_model()
    proto.graph.initializer.append(raw)
    onnx.save(proto, tmp_path / "big.onnx")
    model = read_model(tmp_path / "big.onnx")  # the default threshold: "big" (2 MiB) stays in the file, w does not
    mapped = model.graph.initializers["big"].const_value
    assert isinstance(mapped, EmbeddedTensor)
    piece = GraphEditor(model).initializer("piece", mapped.numpy()[:8])
    assert isinstance(piece.const_value, EmbeddedTensor) and piece.const_value.nbytes < files.DEFER_FROM
    write_model(model, tmp_path / "out.onnx")
    written = onnx.load(str(tmp_path / "out.onnx"), load_external_data=False)
    assert not any(t.external_data for t in written.graph.initializer)
    np.testing.assert_array_equal(
        numpy_helper.to_array(next(t for t in written.graph.initializer if t.name == "piece")), big[:8])


def test_a_skeleton_holds_the_graph_and_metadata_without_the_large_weights(tmp_path, defer_small):
    from convify.onnx.files import read_skeleton  # noqa: PLC0415

    proto = head_model()
    helper.set_model_props(proto, {"convify.report": "{}"})
    onnx.save(proto, tmp_path / "m.onnx")
    skeleton = read_skeleton(tmp_path / "m.onnx")
    assert skeleton.graph.node == proto.graph.node and skeleton.metadata_props == proto.metadata_props
    assert skeleton.ByteSize() < proto.ByteSize() // 10
    assert all(t.data_location == TensorProto.EXTERNAL for t in skeleton.graph.initializer)
