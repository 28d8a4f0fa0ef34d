"""Reading and writing ONNX models as onnx-ir models.

:func:`read_model` takes a path, an ``onnx.ModelProto`` or an ``ir.Model``
and gives an ``ir.Model``; a path is read the way ``onnx_ir.load`` reads it
(external data memory-mapped from beside the file, so a model over 2 GB
reads), after the ONNX checker has passed it. Whatever is wrong with the
input is one :class:`~convify.errors.ModelFileError` line that names the file.
:func:`write_model` saves a model, with external data when the source had
it or when it would not fit in one protobuf (2 GB), and :func:`to_proto`
serializes one in memory.

>>> model = read_model("resnet18.onnx")
>>> write_model(model, "out.onnx")          # None: everything inside out.onnx
"""
from __future__ import annotations

import os
from typing import Any
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from convify.errors import ModelFileError, one_line

#: The most a protobuf message may hold; a model with more initializer bytes needs external data.
PROTOBUF_LIMIT = 2**31 - 1

#: How much room the graph itself (nodes, names, small tensors) is given below the limit.
_GRAPH_ROOM = 64 * 2**20


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
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ModelFileError(f"{path} is not an ONNX model, or is truncated ({one_line(e)}); pass a file written "
                             "by onnx.save or torch.onnx.export") from e
    # The checker reads the file again, by its path: a model over 2 GB is checked with its external data
    _check(str(path), str(path))
    model = _deserialize(proto)
    ir.external_data.set_base_dir(model.graph, path.parent)  # as onnx_ir.load does: external data beside the file
    return model


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
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in _initializers(model))


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
    """
    path = Path(path)
    if external_data is None:
        external_data = has_external_data(model) or initializer_bytes(model) > PROTOBUF_LIMIT - _GRAPH_ROOM
    data = path.with_name(path.name + ".data") if external_data else None
    if data is not None and _reads_from(model, data):
        # ir.save replaces the data file; tensors still to be read from it would read the new one
        ir.external_data.load_to_model(model)
    try:
        if data is None:
            if initializer_bytes(model) > PROTOBUF_LIMIT - _GRAPH_ROOM:
                raise ModelFileError(f"{path}: the model's initializers exceed the 2 GB a protobuf holds; "
                                     "write it with external_data=True (or None)")
            ir.save(model, path)
        else:
            ir.save(model, path, external_data=data.name, size_threshold_bytes=1024)
    except OSError as e:
        raise ModelFileError(f"{path} could not be written: {one_line(e)}") from e
    return data


def _reads_from(model: ir.Model, data: Path) -> bool:
    for value in _initializers(model):
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) and Path(tensor.path).resolve() == data.resolve():
            return True
    return False


def embed_external_data(model: ir.Model, source: Any = None) -> ir.Model:
    """``model`` with the tensors it reads from external data files loaded into memory, so that its
    proto stands alone; ``ModelFileError`` when they would not fit in one protobuf (2 GB)."""
    if not has_external_data(model):
        return model
    if initializer_bytes(model) > PROTOBUF_LIMIT - _GRAPH_ROOM:
        where = f"{source}: " if isinstance(source, (str, os.PathLike)) else ""
        raise ModelFileError(f"{where}its weights exceed the 2 GB an onnx.ModelProto holds, so the rewrite cannot "
                             "be returned as one: rewrite it file to file (convify rewrite MODEL.onnx -o OUT.onnx, "
                             "or convify.onnx.rewrite_onnx then convify.onnx.write_model)")
    return ir.external_data.load_to_model(model)


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """``model`` as an ``onnx.ModelProto`` (external tensors stay references
    to their files: pass the proto to tools that read them from there)."""
    return ir.serde.serialize_model(model)
