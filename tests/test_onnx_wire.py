"""The wire format walker: a skeleton that leaves large weights in the file, and pieces that write the same bytes."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from convify.onnx.wire import (LENGTH, Stream, WireError, fields, read_varint, scan_model, splice_model,
                               streamable, varint)


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**31 - 1, 2**35 + 7, 2**63 - 1])
def test_varints_read_back_as_written(value):
    data = b"\xff" + varint(value) + b"\x01"
    assert read_varint(data, 1, len(data)) == (value, len(data) - 1)


def test_fields_are_the_messages_own_in_file_order():
    tensor = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "w")
    tensor.doc_string = "doc"
    data = tensor.SerializeToString()
    found = [(f.number, f.wire_type) for f in fields(data, 0, len(data))]
    assert found == [(1, 0), (1, 0), (2, 0), (8, LENGTH), (9, LENGTH), (12, LENGTH)]  # dims unpacked: 2, 3
    raw = next(f for f in fields(data, 0, len(data)) if f.number == 9)
    assert data[raw.value:raw.end] == tensor.raw_data


@pytest.mark.parametrize("data, match", [
    (b"\x0a\x05abc", "runs 2 bytes past the end"),   # a 5-byte field with 3 bytes left: truncated
    (b"\x08\x80", "varint runs past the end"),       # a varint cut in the middle
    (b"\x0b", "wire type 3"),                        # a group: no ONNX message has one
    (b"\x00\x01", "field number 0"),
])
def test_what_is_not_a_message_is_a_wire_error(data, match):
    with pytest.raises(WireError, match=match):
        list(fields(data, 0, len(data)))


def model_with(tensors: list[TensorProto]) -> onnx.ModelProto:
    nodes = [helper.make_node("Identity", [t.name], [f"out_{t.name}"], name=f"id_{t.name}") for t in tensors]
    outputs = [helper.make_tensor_value_info(f"out_{t.name}", t.data_type, None) for t in tensors]
    graph = helper.make_graph(nodes, "g", [], outputs, tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], producer_name="wire-test")
    helper.set_model_props(model, {"kept": "yes"})
    return model


def mixed_tensors() -> list[TensorProto]:
    rng = np.random.default_rng(0)
    big = numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "big")
    big.doc_string = "a weight"
    small = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "small")
    listed = helper.make_tensor("listed", TensorProto.FLOAT, [64, 32], rng.standard_normal(64 * 32).tolist())
    halves = numpy_helper.from_array(rng.standard_normal((40, 40)).astype(np.float16), "halves")
    nibbles = helper.make_tensor("nibbles", TensorProto.INT4, [4096], np.zeros(4096, np.int8).tolist())
    return [big, small, listed, halves, nibbles]


def test_a_skeleton_leaves_the_large_raw_weights_in_the_file_and_keeps_the_rest():
    model = model_with(mixed_tensors())
    data = model.SerializeToString()
    skeleton = scan_model(data, "m.onnx", defer_from=1024)
    assert skeleton.deferred == ["big", "halves"]  # float_data, small and 4-bit packed tensors stay as they were
    assert len(skeleton.data) < len(data) - 64 * 32 * 4
    proto = onnx.ModelProto.FromString(skeleton.data)
    by_name = {t.name: t for t in proto.graph.initializer}
    for name in ("big", "halves"):
        t = by_name[name]
        assert t.data_location == TensorProto.EXTERNAL and not t.HasField("raw_data")
        ext = {e.key: e.value for e in t.external_data}
        assert ext["location"] == "m.onnx"
        original = next(o for o in model.graph.initializer if o.name == name)
        start, length = int(ext["offset"]), int(ext["length"])
        assert data[start:start + length] == original.raw_data
        assert list(t.dims) == list(original.dims) and t.data_type == original.data_type
    assert by_name["big"].doc_string == "a weight"
    for name in ("small", "listed", "nibbles"):
        assert by_name[name] == next(o for o in model.graph.initializer if o.name == name)
    # all else as it was
    assert proto.graph.node == model.graph.node and proto.metadata_props == model.metadata_props
    assert proto.producer_name == "wire-test" and proto.opset_import == model.opset_import


def test_an_unnamed_weight_stays_for_the_checker_to_name():
    unnamed = numpy_helper.from_array(np.zeros((64, 32), np.float32), "")
    skeleton = scan_model(model_with([unnamed]).SerializeToString(), "m.onnx", defer_from=16)
    assert skeleton.deferred == []


def test_a_raw_weight_of_the_wrong_size_stays_for_the_checker_to_name():
    bad = numpy_helper.from_array(np.zeros((64, 32), np.float32), "bad")
    bad.raw_data = bad.raw_data[:-4]
    skeleton = scan_model(model_with([bad]).SerializeToString(), "m.onnx", defer_from=16)
    assert skeleton.deferred == []


def test_a_skeleton_of_a_truncated_file_is_a_wire_error():
    data = model_with(mixed_tensors()).SerializeToString()
    with pytest.raises(WireError, match="truncated"):
        scan_model(data[:len(data) - 100], "m.onnx", defer_from=1024)


def test_the_pieces_are_the_bytes_onnx_save_writes():
    """Placeholders in, each tensor's raw bytes streamed where onnx.save puts them: the same bytes, metadata and
    doc strings (fields after raw_data) included."""
    tensors = mixed_tensors()
    tensors[3].metadata_props.add(key="origin", value="test")
    model = model_with(tensors)
    streamed = {"big": ir.tensor(numpy_helper.to_array(tensors[0])),
                "halves": ir.tensor(numpy_helper.to_array(tensors[3]))}
    placeholder = onnx.ModelProto()
    placeholder.CopyFrom(model)
    for t in placeholder.graph.initializer:
        if t.name in streamed:
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            t.external_data.add(key="location", value="placeholder")
    pieces = splice_model(placeholder.SerializeToString(), streamed)
    assert sum(isinstance(p, Stream) for p in pieces) == 2
    written = b"".join(p.tensor.tobytes() if isinstance(p, Stream) else p for p in pieces)
    assert written == model.SerializeToString()


def test_what_streams():
    assert streamable(ir.tensor(np.zeros(3, np.float32)))
    assert not streamable(ir.serde.TensorProtoTensor(numpy_helper.from_array(np.zeros(3, np.float32), "t")))
    assert not streamable(ir.StringTensor(np.array([b"a"]), name="s"))
    assert not streamable(ir.tensor(np.zeros(4, np.int8), dtype=ir.DataType.INT4))
    assert not streamable(None)
