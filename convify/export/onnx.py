"""Export a (rewritten) model to one self-contained, checked ONNX file.

``export_onnx`` wraps ``torch.onnx.export`` with what deployment needs and the
exporter does not do by itself: the weights embedded in the one file (torch
writes them to a side file by default), ``onnx.checker`` with
``full_check=True``, an atomic write, dynamic batch and spatial axes under both
exporters, and a fallback from the dynamo exporter to the legacy one that says
why it happened.

>>> path = convify.export_onnx(convify.replace_maxpool(model), "model.onnx", dynamic_spatial=True)
"""
from __future__ import annotations

import inspect
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from convify.core.report import report
from convify.core.rewrites.head import is_dense
from convify.errors import ExportError, one_line
from convify.export.quiet import run_quietly
from convify.fx import copying
from convify.fx.inputs import as_args
from convify.fx.rewrites.head.sizing import pinned_heads

log = logging.getLogger(__name__)

EXPORTERS = ("dynamo", "legacy")
# protobuf cannot serialize a message over 2 GiB: larger models keep their
# weights in one side file next to the model (``<name>.data``).
PROTOBUF_LIMIT = 2**31 - 1
_BATCH, _HEIGHT, _WIDTH = "batch", "height", "width"


class ExportFallbackWarning(UserWarning):
    """The dynamo exporter failed and the legacy exporter was used instead."""


@dataclass(frozen=True)
class ExportResult:
    """What one export did (``export_onnx`` returns only ``path``; ``verify`` shows the rest)."""

    path: Path
    exporter: str
    fallback_reason: str | None = None
    seconds: float = 0.0
    external_data: Path | None = None
    warnings: tuple[str, ...] = field(default=())


def export_onnx(model: nn.Module, path: str | os.PathLike, example_input: Any = None, *,
                dynamic_batch: bool = True, dynamic_spatial: bool | None = None, opset: int | None = None,
                exporter: str = "dynamo", verbose: bool = False, input_names: Sequence[str] | None = None,
                output_names: Sequence[str] | None = None) -> Path:
    """Export ``model`` (an ``nn.Module`` or a convify ``GraphModule``) to one ONNX file.

    Args:
        model: exported in eval mode (its own train/eval flags are restored).
        path: the ``.onnx`` file to write; written atomically (a failed export
            leaves an existing file untouched and creates nothing).
        example_input: a tensor or tuple of tensors; worked out from the model when omitted.
        dynamic_batch: make dimension 0 of every input and output dynamic.
        dynamic_spatial: make every input dimension after the channels dynamic
            (height and width), so a fully convolutional model runs at other sizes.
            ``None`` (the default): dynamic for a model made with
            ``replace_linear_head(..., dense=True)`` (its report says so), fixed otherwise.
        opset: ONNX opset version; the exporter's default when ``None``.
        exporter: ``"dynamo"`` (torch's current exporter; on failure the legacy one
            is used with an ``ExportFallbackWarning`` stating the reason) or ``"legacy"``.
        verbose: let the exporter print its progress and warnings.
        input_names, output_names: the names of the file's inputs and outputs, one per
            tensor. By default a model that returns a dict (a Hugging Face ``ModelOutput``)
            names them as it does (``pixel_values``, ``logits``); others get ``input`` and
            ``output`` (``input_0``, ``input_1``... for several). Dynamic axes are named
            ``batch``, ``height``, ``width`` (``out_height``, ``out_width`` on outputs).

    Returns:
        ``path`` as a ``pathlib.Path``. Weights are embedded; a model over 2 GB keeps
        them in ``<path>.data`` beside it.

    >>> allconv = convify.replace_maxpool(torchvision.models.squeezenet1_1())
    >>> convify.export_onnx(allconv, "sq.onnx", torch.randn(1, 3, 224, 224), dynamic_spatial=True)
    PosixPath('sq.onnx')
    """
    if dynamic_spatial is None and isinstance(model, nn.Module):
        dynamic_spatial = is_dense(report(model))
    return export(model, path, example_input, dynamic_batch=dynamic_batch, dynamic_spatial=bool(dynamic_spatial),
                  opset=opset, exporter=exporter, verbose=verbose, input_names=input_names,
                  output_names=output_names).path


def export(model: nn.Module, path: str | os.PathLike, example_input: Any = None, *, dynamic_batch: bool = True,
           dynamic_spatial: bool = False, opset: int | None = None, exporter: str = "dynamo",
           verbose: bool = False, input_names: Sequence[str] | None = None,
           output_names: Sequence[str] | None = None) -> ExportResult:
    """``export_onnx`` returning an :class:`ExportResult` (which exporter ran, and why). Spatial axes
    are fixed unless asked for: ``verify`` exports at its example size (and wraps dense models in an
    average over positions, which the legacy exporter cannot make dynamic)."""
    if not isinstance(model, nn.Module):
        raise ExportError(f"export_onnx needs a torch.nn.Module, got {type(model).__name__}")
    if exporter not in EXPORTERS:
        raise ExportError(f"exporter must be 'dynamo' or 'legacy', not {exporter!r}")
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"{path} is a directory; give the .onnx file to write")
    if dynamic_spatial:
        _refuse_pinned_heads(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    args = as_args(model, example_input)
    spec = _AxesSpec.build(model, args, dynamic_batch, dynamic_spatial, input_names, output_names)
    large = _state_bytes(model) > PROTOBUF_LIMIT
    start = time.perf_counter()
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        staged = tmpdir / path.name
        used, fallback, caught = _run_exporters(model, args, staged, spec, opset, exporter, large, verbose)
        data = _finish(staged, spec, large)
        final_data = None
        if data is not None:
            final_data = path.with_name(data.name)
            os.replace(data, final_data)
        os.replace(staged, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return ExportResult(path, used, fallback, time.perf_counter() - start, final_data, caught)


def _refuse_pinned_heads(model: nn.Module) -> None:
    """A head guarded to its traced map size (not dense) cannot run at other
    heights and widths: the dynamo exporter would fail on the guard, and the
    legacy one would drop it and write a file that gives a longer vector."""
    pinned = pinned_heads(model)
    if pinned:
        raise ExportError(
            f"{', '.join(pinned)}: a classifier head rewritten without {{dense}} computes the original's output "
            "only at the map size it was traced at, so its ONNX file cannot take other heights and widths: "
            "export with {fixed_spatial}, or rewrite with {dense} for a score map at any size")


# --------------------------------------------------------------------------- axes


@dataclass(frozen=True)
class _AxesSpec:
    """Input/output names and which of their axes are dynamic."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    input_axes: tuple[dict[int, str], ...]
    output_axes: tuple[dict[int, str], ...]

    @classmethod
    def build(cls, model: nn.Module, args: tuple, dynamic_batch: bool, dynamic_spatial: bool,
              input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None) -> "_AxesSpec":
        keys, outputs = _flat_outputs(model, args)
        n_in, n_out = len(args), len(outputs)
        if keys is not None:  # a ModelOutput: the model's own names
            default_in, default_out = _parameter_names(model, n_in), tuple(keys)
        else:
            default_in = ("input",) if n_in == 1 else tuple(f"input_{i}" for i in range(n_in))
            default_out = ("output",) if n_out == 1 else tuple(f"output_{i}" for i in range(n_out))
        input_names = _given_names("input_names", input_names, n_in, "inputs") or default_in
        output_names = _given_names("output_names", output_names, n_out, "outputs") or default_out
        shared = sorted(set(input_names) & set(output_names))
        if shared:
            raise ExportError(f"an ONNX input and output cannot share a name: {shared}")
        input_axes = tuple(_axes(t.dim(), dynamic_batch, dynamic_spatial, "", i, n_in) for i, t in enumerate(args))
        output_axes = tuple(_axes(t.dim(), dynamic_batch, dynamic_spatial, "out_", i, n_out)
                            for i, t in enumerate(outputs))
        return cls(tuple(input_names), tuple(output_names), input_axes, output_axes)

    @property
    def dynamic(self) -> bool:
        return any(self.input_axes)

    def legacy_dynamic_axes(self) -> dict[str, dict[int, str]] | None:
        if not self.dynamic:
            return None
        named = zip(self.input_names + self.output_names, self.input_axes + self.output_axes)
        return {name: axes for name, axes in named if axes}

    def dynamo_dynamic_shapes(self) -> tuple[dict[int, Any], ...] | None:
        if not self.dynamic:
            return None
        # Dim.DYNAMIC lets torch.export find the valid range (a conv net needs a
        # minimum size) but fails when the model pins the axis to one value:
        # exactly "dynamic, or a clear error".
        return tuple({axis: torch.export.Dim.DYNAMIC for axis in axes} for axes in self.input_axes)


def _axes(ndim: int, batch: bool, spatial: bool, prefix: str, index: int, count: int) -> dict[int, str]:
    suffix = "" if count == 1 else f"_{index}"
    axes: dict[int, str] = {}
    if batch and ndim >= 1:
        axes[0] = _BATCH  # one batch size for every input and output
    if spatial and ndim >= 3:
        names = [_HEIGHT, _WIDTH] if ndim == 4 else [f"dim{d}" for d in range(2, ndim)]
        axes.update({d: f"{prefix}{name}{suffix}" for d, name in zip(range(2, ndim), names)})
    return axes


def _flat_outputs(model: nn.Module, args: tuple) -> tuple[list[str] | None, list[torch.Tensor]]:
    """The model's output tensors in the exporters' order, and their names
    when it returns a dict (a ``ModelOutput``: ``logits``), else None."""
    try:
        with torch.no_grad(), copying.eval_mode(model):
            out = model(*args)
    except Exception as e:
        raise ExportError(f"{type(model).__name__} does not run on the example input "
                          f"({', '.join(_describe(a) for a in args)}): {one_line(e)}; pass an "
                          "example_input the model accepts") from e
    named = [(k, t) for k, t in _leaves(out, "") if isinstance(t, torch.Tensor)]
    if not named:
        raise ExportError(f"{type(model).__name__} returned no tensor ({type(out).__name__}); ONNX "
                          "export needs tensor outputs")
    keys = [k for k, _ in named] if isinstance(out, dict) and len({k for k, _ in named}) == len(named) else None
    return keys, [t for _, t in named]


def _leaves(value: Any, key: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _leaves(v, f"{key}_{i}" if key else str(i))
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, f"{key}_{k}" if key else str(k))
    else:
        yield key, value


def _parameter_names(model: nn.Module, count: int) -> tuple[str, ...]:
    """The names of the forward's first ``count`` parameters (``pixel_values``)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:count]
    if len(names) < count:
        return ("input",) if count == 1 else tuple(f"input_{i}" for i in range(count))
    return tuple(names)


def _given_names(option: str, names: Sequence[str] | None, count: int, what: str) -> tuple[str, ...] | None:
    if names is None:
        return None
    names = tuple(names) if not isinstance(names, str) else (names,)
    if len(names) != count:
        raise ExportError(f"{{{option}}} gives {len(names)} name{'s' if len(names) != 1 else ''} "
                          f"({', '.join(names) or 'none'}) for the model's {count} {what}: give one per tensor")
    if any(not n for n in names) or len(set(names)) != len(names):
        raise ExportError(f"{{{option}}} must be distinct, non-empty names, got {list(names)}")
    return names


def _describe(t: torch.Tensor) -> str:
    return f"{'x'.join(map(str, t.shape))} {str(t.dtype).removeprefix('torch.')}"


def _state_bytes(model: nn.Module) -> int:
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


# --------------------------------------------------------------------------- exporters


def _run_exporters(model: nn.Module, args: tuple, staged: Path, spec: _AxesSpec, opset: int | None,
                   exporter: str, large: bool, verbose: bool) -> tuple[str, str | None, tuple[str, ...]]:
    def legacy() -> tuple[str, ...]:
        return run_quietly(_export_legacy, model, args, staged, spec, opset, large, verbose, verbose=verbose)

    if exporter == "legacy":
        try:
            caught = legacy()
        except Exception as e:
            raise ExportError(
                f"could not export {type(model).__name__} to ONNX with the legacy exporter: {one_line(e)}; "
                "try exporter='dynamo', or export_onnx(..., verbose=True) for the exporter's own messages") from e
        return "legacy", None, caught
    try:
        caught = run_quietly(_export_dynamo, model, args, staged, spec, opset, large, verbose, verbose=verbose)
        return "dynamo", None, caught
    except Exception as dynamo_error:  # any exporter failure: fall back, then say so
        reason = one_line(dynamo_error)
        _clear(staged)
        try:
            caught = legacy()
        except Exception as legacy_error:
            raise ExportError(
                f"could not export {type(model).__name__} to ONNX: the dynamo exporter failed ({reason}) "
                f"and so did the legacy one ({one_line(legacy_error)}); run export_onnx(..., verbose=True) "
                "for the exporters' own messages") from legacy_error
        message = (f"the dynamo exporter failed on {type(model).__name__} ({reason}); exported with the "
                   "legacy TorchScript exporter instead (pass exporter='legacy' to skip the attempt)")
        log.warning(message)
        warnings.warn(message, ExportFallbackWarning, stacklevel=4)
        return "legacy", reason, caught


def _export_dynamo(model: nn.Module, args: tuple, staged: Path, spec: _AxesSpec, opset: int | None,
                   large: bool, verbose: bool) -> None:
    with copying.eval_mode(model):
        torch.onnx.export(
            model, args, str(staged), dynamo=True, external_data=large, opset_version=opset,
            input_names=list(spec.input_names), output_names=list(spec.output_names),
            dynamic_shapes=spec.dynamo_dynamic_shapes(), verbose=None if verbose else False,
        )


def _export_legacy(model: nn.Module, args: tuple, staged: Path, spec: _AxesSpec, opset: int | None,
                   large: bool, verbose: bool) -> None:
    # The legacy exporter decides on external data by itself (above 2 GB).
    with copying.eval_mode(model):
        torch.onnx.export(
            model, args, str(staged), dynamo=False, opset_version=opset,
            input_names=list(spec.input_names), output_names=list(spec.output_names),
            dynamic_axes=spec.legacy_dynamic_axes(), verbose=verbose,
        )


def _clear(staged: Path) -> None:
    for f in staged.parent.iterdir():
        f.unlink()


# --------------------------------------------------------------------------- one file, checked


def _finish(staged: Path, spec: _AxesSpec, large: bool) -> Path | None:
    """Rewrite the staged export as one file (or one file plus ``.data`` when
    too large), check it, and return the side file's staged path if any."""
    import onnx  # noqa: PLC0415  (heavy; loaded on first export)

    if not staged.exists():
        raise ExportError(f"the exporter reported success but wrote no file at {staged}")
    proto = onnx.load(str(staged), load_external_data=True)
    _check_dynamic(proto, spec)
    _name_dynamic_axes(proto, spec)
    for f in staged.parent.iterdir():
        f.unlink()
    data: Path | None = None
    if large or proto.ByteSize() > PROTOBUF_LIMIT:
        data = staged.with_name(staged.name + ".data")
        onnx.save_model(proto, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(proto, str(staged))
    try:
        if data is None:
            onnx.checker.check_model(proto, full_check=True)
        else:  # a model over 2 GB can only be checked by path
            onnx.checker.check_model(str(staged), full_check=True)
    except Exception as e:
        raise ExportError(f"the exported ONNX graph does not pass onnx.checker (full_check=True): "
                          f"{one_line(e)}") from e
    return data


def _check_dynamic(proto: Any, spec: _AxesSpec) -> None:
    """Every axis asked to be dynamic must be symbolic in the file's inputs."""
    by_name = {i.name: i for i in proto.graph.input}
    for name, axes in zip(spec.input_names, spec.input_axes):
        value = by_name.get(name)
        if value is None or not axes:
            continue
        dims = value.type.tensor_type.shape.dim
        pinned = [a for a in axes if a < len(dims) and dims[a].HasField("dim_value")]
        if pinned:
            raise ExportError(
                f"input {name!r} was exported with a fixed size on axes {pinned} that were asked to be dynamic "
                f"({[axes[a] for a in pinned]}); the model's forward fixes them (a flatten into a Linear, a "
                "reshape to constants): rewrite its head first, or export with dynamic_spatial=False")


def _name_dynamic_axes(proto: Any, spec: _AxesSpec) -> None:
    """Give the dynamo exporter's symbols (``s77``) the names the legacy exporter
    uses (``batch``, ``height``, ``width``), wherever one symbol means one axis,
    also inside the expressions of inner shapes (``((height - 1)//32) + 1``); an
    output's dynamic axis that is such an expression gets its own name
    (``out_height``), as the legacy exporter gives it."""
    wanted: dict[str, set[str]] = {}
    by_name = {i.name: i for i in proto.graph.input}
    for name, axes in zip(spec.input_names, spec.input_axes):
        value = by_name.get(name)
        if value is None:
            continue
        dims = value.type.tensor_type.shape.dim
        for axis, label in axes.items():
            if axis < len(dims) and dims[axis].dim_param:
                wanted.setdefault(dims[axis].dim_param, set()).add(label)
    rename = {sym: labels.pop() for sym, labels in wanted.items() if len(labels) == 1 and sym not in
              {label for ls in wanted.values() for label in ls}}
    if rename:
        symbol = re.compile(r"\b(" + "|".join(map(re.escape, sorted(rename, key=len, reverse=True))) + r")\b")
        for value in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
            for dim in value.type.tensor_type.shape.dim:
                if dim.dim_param:
                    dim.dim_param = symbol.sub(lambda m: rename[m.group(1)], dim.dim_param)
    by_name = {o.name: o for o in proto.graph.output}
    for name, axes in zip(spec.output_names, spec.output_axes):
        value = by_name.get(name)
        dims = value.type.tensor_type.shape.dim if value is not None else ()
        for axis, label in axes.items():
            if axis < len(dims) and dims[axis].dim_param and not dims[axis].dim_param.isidentifier():
                dims[axis].dim_param = label


def input_names(path: str | os.PathLike) -> list[str]:
    """The graph input names of an exported file (``["input"]`` for one input)."""
    import onnx  # noqa: PLC0415

    return [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]
