"""Reading and writing ONNX models as onnx-ir models.

:func:`read_model` takes a path, an ``onnx.ModelProto`` or an ``ir.Model``
and gives an ``ir.Model``; a path is read the way ``onnx_ir.load`` reads it
(external data memory-mapped from beside the file, so a model over 2 GB
reads), after the ONNX checker has passed it. Whatever is wrong with the
input is one :class:`~convify.errors.ModelFileError` line that names the file.
:func:`write_model` saves a model, with external data when the source had
it or when it would not fit in one protobuf (2 GB), and :func:`to_proto`
serializes one in memory.

A file's large weights are not loaded: each initializer of 1 MiB or more
stays in the file (:class:`EmbeddedTensor`, memory-mapped when something
reads it, :mod:`.wire`), and :func:`write_model` streams the weights into
the new file one tensor at a time, as a kernel copy where a weight is a
range of a file. Rewriting a 550 MB file so holds the graph and one tensor,
not three copies of the model (``benchmarks/onnx_rewrite_speed.py``).

>>> model = read_model("resnet18.onnx")
>>> write_model(model, "out.onnx")          # None: everything inside out.onnx
"""
from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
import weakref
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from convify.errors import ModelFileError, one_line
from convify.onnx.wire import Stream, WireError, scan_model, splice_model, streamable

#: The most a protobuf message may hold; a model with more initializer bytes needs external data.
PROTOBUF_LIMIT = 2**31 - 1

#: How much room the graph itself (nodes, names, small tensors) is given below the limit.
_GRAPH_ROOM = 64 * 2**20

#: Initializers of at least this many bytes stay in the file when read and are streamed when written.
DEFER_FROM = 2**20


class EmbeddedTensor(ir.ExternalTensor):
    """A tensor stored inside an ``.onnx`` file (its ``raw_data``), read on
    demand by memory map as external data is. Unlike external data it belongs
    in the file written: :func:`write_model` copies its bytes there."""

    def _load(self) -> None:
        super()._load()
        if self.raw is not None:
            _MAPPED.add(self)


#: The embedded tensors whose file is mapped now: where a new weight may be a view of one (:func:`file_range`).
_MAPPED: "weakref.WeakSet[EmbeddedTensor]" = weakref.WeakSet()


def file_range(array: np.ndarray, name: str) -> EmbeddedTensor | None:
    """``array`` as an :class:`EmbeddedTensor` named ``name`` when it is a
    contiguous view of an embedded tensor's mapped file (a reshaped weight:
    the same bytes), so that writing it copies them from the file; else None."""
    if array.size == 0 or not array.flags.c_contiguous or array.dtype.byteorder == ">" or not _MAPPED:
        return None
    try:
        dtype = ir.DataType.from_numpy(array.dtype)
    except TypeError:
        return None
    start = array.__array_interface__["data"][0]
    for tensor in list(_MAPPED):
        raw = tensor.raw
        if raw is None or raw.closed:
            continue
        base = np.frombuffer(raw, np.uint8).__array_interface__["data"][0]
        if base <= start and start + array.nbytes <= base + len(raw):
            return EmbeddedTensor(tensor.location, start - base, array.nbytes, dtype, shape=ir.Shape(array.shape),
                                  name=name, base_dir=tensor.base_dir)
    return None


def read_model(source: str | os.PathLike | onnx.ModelProto | ir.Model) -> ir.Model:
    """``source`` as an ``ir.Model``: a file (with its external data), a
    proto, or an ``ir.Model``, which is returned as it is (not copied).

    A file or proto must pass ``onnx.checker.check_model``; one that is not
    ONNX, is truncated or is rejected raises :class:`ModelFileError` with one
    line that names it and quotes the first line of what was wrong.
    """
    if isinstance(source, ir.Model):
        return source
    if isinstance(source, onnx.ModelProto):
        _check(source, "the ONNX model given")
        return _deserialize(source)
    if isinstance(source, (str, os.PathLike)):
        return _read_file(Path(source))
    raise ModelFileError(f"expected a path, an onnx.ModelProto or an onnx_ir.Model, got {type(source).__name__}")


def _read_file(path: Path) -> ir.Model:
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    if path.stat().st_size == 0:
        raise ModelFileError(f"{path} is empty, not an ONNX model")
    try:
        proto, deferred = _skeleton(path)
    except (DecodeError, WireError, RuntimeError, ValueError) as e:
        raise ModelFileError(f"{path} is not an ONNX model, or is truncated ({one_line(e)}); pass a file written "
                             "by onnx.save or torch.onnx.export") from e
    if _external_tensors(proto) > len(deferred):
        _check(str(path), str(path))  # the checker reads the file by its path: with its external data (over 2 GB)
    else:
        _check(_checkable(proto, deferred), str(path))
    model = _deserialize(proto)
    ir.external_data.set_base_dir(model.graph, path.parent)  # as onnx_ir.load does: external data beside the file
    real = path.resolve()  # the file named, wherever a symlink leads (onnx-ir refuses a link out of base_dir)
    for name in deferred:
        value = model.graph.initializers[name]
        t = value.const_value
        value.const_value = EmbeddedTensor(real.name, t.offset, t.length, t.dtype, shape=t.shape, name=t.name,
                                           doc_string=t.doc_string, metadata_props=dict(t.metadata_props),
                                           base_dir=real.parent)
    return model


def read_skeleton(path: str | os.PathLike) -> onnx.ModelProto:
    """The model in the file at ``path`` without its large weights (each a
    reference into the file, :func:`~.wire.scan_model`): its graph, metadata
    and op types for a fraction of ``onnx.load``'s time and memory. Not
    checked; a file that is not ONNX raises what :func:`read_model` catches
    (``WireError``, ``DecodeError``, ``OSError``)."""
    return _skeleton(Path(path))[0]


def _skeleton(path: Path) -> tuple[onnx.ModelProto, set[str]]:
    if path.stat().st_size == 0:
        return onnx.ModelProto(), set()  # mmap cannot map an empty file; an empty message it is
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        skeleton = scan_model(buf, path.name, defer_from=DEFER_FROM)
    return onnx.ModelProto.FromString(skeleton.data), set(skeleton.deferred)


def _external_tensors(proto: onnx.ModelProto) -> int:
    """How many tensors of ``proto`` (initializers and attributes, in every graph and function) are external data."""
    return sum(1 for t in _tensors(proto) if t.data_location == onnx.TensorProto.EXTERNAL)


def _tensors(proto: onnx.ModelProto):
    graphs, nodes = [proto.graph], [n for f in proto.functions for n in f.node]
    while graphs or nodes:
        if graphs:
            graph = graphs.pop()
            yield from graph.initializer
            nodes.extend(graph.node)
            continue
        for attr in nodes.pop().attribute:
            yield from ([attr.t] if attr.HasField("t") else []) + list(attr.tensors)
            graphs.extend(([attr.g] if attr.HasField("g") else []) + list(attr.graphs))


def _checkable(proto: onnx.ModelProto, deferred: set[str]) -> onnx.ModelProto:
    """A copy of the skeleton for the checker: each deferred initializer one
    element of its type (the checker would look for its reference in the
    working directory; its size was checked when it was deferred)."""
    if not deferred:
        return proto
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for tensor in copy.graph.initializer:
        if tensor.name in deferred:
            tensor.ClearField("external_data")
            tensor.ClearField("data_location")
            tensor.ClearField("dims")
            tensor.raw_data = bytes(ir.DataType(tensor.data_type).bitwidth // 8)
    return copy


def _deserialize(proto: onnx.ModelProto) -> ir.Model:
    """The proto as an ``ir.Model`` that serializes back to it: onnx-ir gives
    every initializer its tensor's type and shape, which it then writes as
    ``value_info`` the file did not have; those are taken off again (the
    tensor says the same)."""
    model = ir.serde.deserialize_model(proto)
    declared = set(_value_info_names(proto.graph))
    for graph in (model.graph, *model.graph.subgraphs()):
        for name, value in graph.initializers.items():
            if name not in declared and not value.is_graph_input():
                value.type, value.shape = None, None
    return model


def _value_info_names(graph: onnx.GraphProto):
    yield from (info.name for info in graph.value_info)
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _value_info_names(sub)


def _check(model: onnx.ModelProto | str, what: str) -> None:
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as e:
        lines = str(e).strip().splitlines()
        first = lines[0].strip().rstrip(".") if lines else type(e).__name__
        raise ModelFileError(f"{what}: the ONNX checker rejects it: {first}; fix or re-export the model") from e


def has_external_data(model: ir.Model) -> bool:
    """Whether any initializer of ``model`` is stored outside its ``.onnx`` file."""
    return any(isinstance(v.const_value, ir.ExternalTensor) and not isinstance(v.const_value, EmbeddedTensor)
               for v in _initializers(model))


def initializer_bytes(model: ir.Model) -> int:
    """The bytes all initializers of ``model`` hold (all its graphs)."""
    return sum(v.const_value.nbytes for v in _initializers(model) if v.const_value is not None)


def _initializers(model: ir.Model) -> list[ir.Value]:
    return [v for g in (model.graph, *model.graph.subgraphs()) for v in g.initializers.values()]


def write_model(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> Path | None:
    """Save ``model`` at ``path``; returns the external data file written, or None.

    ``external_data=None`` chooses: external data (``<name>.data`` beside
    ``path``, tensors of 1 KiB and more) when the model read had some or
    when its initializers would not fit in one protobuf (2 GB); everything
    inside the ``.onnx`` file otherwise. True or False forces the choice.
    A model inside one file is written to a temporary file beside ``path``
    that replaces it when complete, its weights streamed one at a time.
    """
    path = Path(path)
    if external_data is None:
        external_data = has_external_data(model) or initializer_bytes(model) > PROTOBUF_LIMIT - _GRAPH_ROOM
    data = path.with_name(path.name + ".data") if external_data else None
    # ir.save replaces the data file, and the new .onnx replaces the old: tensors still to be read from either
    _load_from(model, [p for p in (data, path) if p is not None])
    try:
        if data is None:
            if initializer_bytes(model) > PROTOBUF_LIMIT - _GRAPH_ROOM:
                raise ModelFileError(f"{path}: the model's initializers exceed the 2 GB a protobuf holds; "
                                     "write it with external_data=True (or None)")
            _write_streaming(model, path)
        else:
            ir.save(model, path, external_data=data.name, size_threshold_bytes=1024)
    except OSError as e:
        raise ModelFileError(f"{path} could not be written: {one_line(e)}") from e
    return data


def _load_from(model: ir.Model, files: list[Path]) -> None:
    """Loads into memory the tensors of ``model`` that read from one of ``files``, which are about to be replaced."""
    targets = {f.resolve() for f in files}
    reading = [v for v in _initializers(model)
               if isinstance(v.const_value, ir.ExternalTensor) and Path(v.const_value.path).resolve() in targets]
    loaded = ir.external_data.convert_tensors_from_external([v.const_value for v in reading])
    for value, tensor in zip(reading, loaded):
        value.const_value = tensor


def _write_streaming(model: ir.Model, path: Path) -> None:
    """``ir.save(model, path)``'s bytes, its large weights streamed: the model
    is serialized with placeholders for them (:func:`~.wire.splice_model`).
    A symlink at ``path`` stays: the file it leads to is the one replaced."""
    path = Path(os.path.realpath(path))
    streams = {v.name: v.const_value for v in model.graph.initializers.values() if streamable(v.const_value) and (
        v.const_value.nbytes >= DEFER_FROM or isinstance(v.const_value, EmbeddedTensor))}  # which belongs inside
    placeholders = {name: ir.ExternalTensor("placeholder", None, None, t.dtype, shape=t.shape, name=name,
                                            doc_string=t.doc_string, metadata_props=dict(t.metadata_props))
                    for name, t in streams.items()}
    with _standing_in(model, placeholders):
        pieces = splice_model(ir.serde.serialize_model(model).SerializeToString(), streams)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, _file_mode(path))
        with os.fdopen(fd, "wb") as f:
            for piece in pieces:
                if isinstance(piece, Stream):
                    _stream(piece, f, path)
                else:
                    f.write(piece)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _file_mode(path: Path) -> int:
    """The mode a file written at ``path`` gets: the file's own where it exists, else what ``open`` gives
    (0o666 less the umask; a temporary file is 0o600)."""
    if path.exists():
        return path.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _stream(piece: Stream, f: Any, path: Path) -> None:
    f.flush()
    start = f.tell()
    piece.tensor.tofile(f)
    f.flush()
    f.seek(0, os.SEEK_END)
    if f.tell() - start != piece.length:
        raise ModelFileError(f"{path}: tensor {piece.tensor.name!r} wrote {f.tell() - start} bytes where its type "
                             f"and shape need {piece.length}; the file is not written")


@contextlib.contextmanager
def _standing_in(model: ir.Model, tensors: dict[str, ir.TensorProtocol]) -> Iterator[None]:
    """Within the block, each initializer named in ``tensors`` of the main
    graph holds that tensor instead of its own (restored after)."""
    values = [model.graph.initializers[name] for name in tensors]
    kept = [v.const_value for v in values]
    try:
        for value in values:
            value.const_value = tensors[value.name]
        yield
    finally:
        for value, tensor in zip(values, kept):
            value.const_value = tensor


def embed_external_data(model: ir.Model, source: Any = None) -> ir.Model:
    """``model`` with the tensors it reads from files (external data, weights
    left in the ``.onnx`` read) loaded into memory, so that its proto stands
    alone; ``ModelFileError`` when they would not fit in one protobuf (2 GB)."""
    if not any(isinstance(v.const_value, ir.ExternalTensor) for v in _initializers(model)):
        return model
    if initializer_bytes(model) > PROTOBUF_LIMIT - _GRAPH_ROOM:
        where = f"{source}: " if isinstance(source, (str, os.PathLike)) else ""
        raise ModelFileError(f"{where}its weights exceed the 2 GB an onnx.ModelProto holds, so the rewrite cannot "
                             "be returned as one: rewrite it file to file (convify rewrite MODEL.onnx -o OUT.onnx, "
                             "or convify.onnx.rewrite_onnx then convify.onnx.write_model)")
    return ir.external_data.load_to_model(model)


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """``model`` as an ``onnx.ModelProto``: weights left in the ``.onnx``
    file read are copied in; external tensors stay references to their files
    (pass the proto to tools that read them from there)."""
    in_memory = {v.name: ir.Tensor(v.const_value.numpy(), name=v.name, dtype=v.const_value.dtype)
                 for v in model.graph.initializers.values() if isinstance(v.const_value, EmbeddedTensor)}
    with _standing_in(model, in_memory):  # only the main graph's initializers are left in the file (read_model)
        return ir.serde.serialize_model(model)
