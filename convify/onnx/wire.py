"""An ONNX file's protobuf wire format, walked without parsing its weights.

``onnx.load`` then ``onnx.save`` holds a file's bytes, its parsed message
and the serialized copy at once: three times the file. convify's rewrites
read and write only the graph around the weights, so a large file is read
and written through its wire format instead:

* :func:`scan_model` walks the file (memory-mapped) field by field and
  returns a *skeleton*: the same ``ModelProto`` bytes, but each large
  main-graph initializer's ``raw_data`` replaced by an external-data
  reference into the file itself (its offset and length). The skeleton is
  a few kilobytes; the weights stay on disk until something reads them.
* :func:`splice_model` takes a serialized model whose large initializers are
  placeholders and gives the pieces of the file to write: bytes, and a
  :class:`Stream` per tensor, which the writer copies tensor by tensor
  (``tofile``: for a range of a file, a kernel copy). The result is byte for
  byte what ``onnx.save`` writes for the same model (fields in number
  order), and only one tensor's bytes pass through memory at a time.

Field numbers are onnx.proto3's (ModelProto.graph = 7, GraphProto.initializer
= 5, TensorProto.raw_data = 9).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import onnx
import onnx_ir as ir

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5
MODEL_GRAPH, GRAPH_INITIALIZER, TENSOR_RAW_DATA = 7, 5, 9

#: Data types whose raw bytes are whole elements (no 4-, 2- or 6-bit packing, no strings): those a skeleton defers.
_WHOLE_BYTES = frozenset(t for t in ir.DataType if t not in (ir.DataType.UNDEFINED, ir.DataType.STRING)
                         and t.bitwidth % 8 == 0)


class WireError(ValueError):
    """The bytes are not a protobuf message: a bad tag, a field past the end (truncated)."""


@dataclass(frozen=True)
class Field:
    """One field of a message: its number and wire type; ``start`` is its tag's
    offset, ``value`` its payload's (after the length of a LENGTH field), ``end`` the offset after it."""

    number: int
    wire_type: int
    start: int
    value: int
    end: int


def read_varint(buf: Any, pos: int, end: int) -> tuple[int, int]:
    """The varint at ``pos`` and the offset after it."""
    result = shift = 0
    while True:
        if pos >= end:
            raise WireError(f"a varint runs past the end of its message at byte {pos} (truncated?)")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError(f"a varint longer than 10 bytes at byte {pos}")


def fields(buf: Any, start: int, end: int) -> Iterator[Field]:
    """The fields of the message in ``buf[start:end]``, in file order (groups, deprecated since proto2, refused)."""
    pos = start
    while pos < end:
        key, value = read_varint(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError(f"field number 0 at byte {pos}")
        if wire_type == VARINT:
            after = read_varint(buf, value, end)[1]
        elif wire_type == FIXED64:
            after = value + 8
        elif wire_type == FIXED32:
            after = value + 4
        elif wire_type == LENGTH:
            length, value = read_varint(buf, value, end)
            after = value + length
        else:
            raise WireError(f"wire type {wire_type} (field {number}) at byte {pos}")
        if after > end:
            raise WireError(f"field {number} at byte {pos} runs {after - end} bytes past the end of its message "
                            "(truncated?)")
        yield Field(number, wire_type, pos, value, after)
        pos = after


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def length_prefix(number: int, length: int) -> bytes:
    """The tag and length that open a LENGTH field ``number`` of ``length`` bytes."""
    return varint(number << 3 | LENGTH) + varint(length)


# --------------------------------------------------------------------------- reading: the skeleton


@dataclass
class Skeleton:
    """A model's bytes with its large initializers left in the file: ``deferred``
    names them (each now an external-data reference to ``location``)."""

    data: bytes
    deferred: list[str] = field(default_factory=list)


def scan_model(buf: Any, location: str, *, defer_from: int) -> Skeleton:
    """The skeleton of the serialized ``ModelProto`` in ``buf`` (bytes or an
    mmap): each main-graph initializer whose ``raw_data`` holds at least
    ``defer_from`` bytes of whole elements, exactly as many as its dims and
    type need, becomes a reference to ``location`` (the file's name) at the
    raw data's offset. Anything else (small tensors, other encodings, a size
    the checker would refuse) stays in the skeleton as it was."""
    deferred: list[str] = []

    def defer(initializer: Field) -> list[bytes | Stream] | None:
        tensor = _deferred_tensor(buf, initializer, location, defer_from)
        if tensor is None:
            return None
        proto, name = tensor
        deferred.append(name)
        return [length_prefix(GRAPH_INITIALIZER, len(proto)), proto]

    return Skeleton(b"".join(_with_initializers(buf, defer)), deferred)  # no Stream: each piece is bytes


def _with_initializers(buf: Any, replace: Callable[[Field], list[bytes | Stream] | None]) -> list[bytes | Stream]:
    """The serialized model in ``buf`` as pieces, each main-graph initializer
    field replaced by ``replace(field)`` where that is not None (whole fields,
    tag and length included); the graph's length is redone to match."""
    out: list[bytes | Stream] = []
    for f in fields(buf, 0, len(buf)):
        if f.number != MODEL_GRAPH or f.wire_type != LENGTH:
            out.append(bytes(buf[f.start:f.end]))
            continue
        graph: list[bytes | Stream] = []
        for g in fields(buf, f.value, f.end):
            replaced = replace(g) if g.number == GRAPH_INITIALIZER and g.wire_type == LENGTH else None
            graph += replaced if replaced is not None else [bytes(buf[g.start:g.end])]
        out += [length_prefix(MODEL_GRAPH, _size(graph)), *graph]
    return out


def _deferred_tensor(buf: Any, initializer: Field, location: str, defer_from: int) -> tuple[bytes, str] | None:
    raw = None
    header = bytearray()
    for t in fields(buf, initializer.value, initializer.end):
        if t.number == TENSOR_RAW_DATA and t.wire_type == LENGTH and raw is None:
            raw = t
        else:
            header += buf[t.start:t.end]
    if raw is None or raw.end - raw.value < max(defer_from, 1):
        return None
    tensor = onnx.TensorProto.FromString(bytes(header))
    if (not tensor.name or tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.data_type not in _WHOLE_BYTES
            or any(d < 0 for d in tensor.dims)):
        return None
    if math.prod(tensor.dims) * (ir.DataType(tensor.data_type).bitwidth // 8) != raw.end - raw.value:
        return None  # the checker names the size that is wrong
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", raw.value), ("length", raw.end - raw.value)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)
    return tensor.SerializeToString(), tensor.name


# --------------------------------------------------------------------------- writing: the pieces


@dataclass(frozen=True)
class Stream:
    """A tensor's raw bytes, ``length`` of them, written by ``tensor.tofile``."""

    tensor: ir.TensorProtocol
    length: int


def splice_model(data: bytes, streams: dict[str, ir.TensorProtocol]) -> list[bytes | Stream]:
    """The pieces of the file for the serialized model ``data``, in which each
    main-graph initializer named in ``streams`` is a placeholder (any
    ``TensorProto`` without data): that tensor's ``raw_data`` comes from
    ``streams[name]``, where ``onnx.save`` would put it (after ``name``,
    before ``doc_string``), and its placeholder's external-data fields go."""
    return _with_initializers(data, lambda initializer: _streamed_tensor(data, initializer, streams))


def _streamed_tensor(data: bytes, initializer: Field, streams: dict[str, ir.TensorProtocol]
                     ) -> list[bytes | Stream] | None:
    tensor = onnx.TensorProto.FromString(data[initializer.value:initializer.end])
    source = streams.get(tensor.name)
    if source is None:
        return None
    tensor.ClearField("external_data")
    tensor.ClearField("data_location")
    header = tensor.SerializeToString()
    split = next((t.start for t in fields(header, 0, len(header)) if t.number > TENSOR_RAW_DATA), len(header))
    raw = Stream(source, source.nbytes)
    body: list[bytes | Stream] = [header[:split], length_prefix(TENSOR_RAW_DATA, raw.length), raw, header[split:]]
    return [length_prefix(GRAPH_INITIALIZER, _size(body)), *body]


def _size(pieces: list[bytes | Stream]) -> int:
    return sum(p.length if isinstance(p, Stream) else len(p) for p in pieces)


def streamable(tensor: ir.TensorProtocol | None) -> bool:
    """Whether ``tensor``'s bytes can be streamed as ``raw_data``: whole
    elements, and a tensor ir would write as raw data anyway (not one read
    from a proto, which is copied as it was: ``float_data`` stays ``float_data``)."""
    return (tensor is not None and tensor.dtype in _WHOLE_BYTES
            and not isinstance(tensor, (ir.TensorProtoTensor, ir.StringTensor)))
