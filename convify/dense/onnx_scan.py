"""``dense_map`` and ``scan`` on a dense ONNX model: the tiles run in an onnxruntime session.

A dense ONNX model is one made by ``replace_linear_head(model.onnx,
dense=True)`` (``convify rewrite MODEL.onnx --dense``: the report in its
``metadata_props`` records a head pass with ``dense=True``), or one that
carries no head pass and takes any height and width (``export_onnx`` of a
dense PyTorch model). One whose report has a head pass without ``dense``, or
whose image input has a fixed height or width, is refused
(:class:`NotDenseError`, naming how to make a dense copy).

The geometry (stride, receptive field, offset) and the map's size come from
the graph (:mod:`convify.dense.onnx_geometry`); tiles are planned and
stitched as for a PyTorch model (:mod:`convify.dense.tiles`,
:mod:`convify.dense.stitching`). onnx and onnxruntime are imported here
only, and this module only when an ONNX model is given.

>>> scores = convify.dense_map("resnet18_dense.onnx", "slide.tiff", provider="cuda")
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import torch

from convify.core.rewrites.head import SPEC as HEAD
from convify.core.rewrites.head import is_dense as dense_report
from convify.dense.geometry import NotDenseError
from convify.dense.images import as_image
from convify.dense.onnx_geometry import GraphWalk, image_input, is_channels_last, walk_graph
from convify.dense.runners import Ranks
from convify.dense.stitching import Scan, run_and_stitch
from convify.dense.tiles import ACTIVATION_FACTOR, batch_for_budget, minimum_tile, plan_tiles, tile_for_budget
from convify.errors import UsageError
from convify.export.sessions import execution_provider, open_session
from convify.onnx import read_model, report_of, write_model

OnnxModel = str | os.PathLike | onnx.ModelProto | ir.Model


def read_dense(source: OnnxModel) -> ir.Model:
    """``source`` read as an ``ir.Model``, refused with :class:`NotDenseError` unless it is dense."""
    model = read_model(source)
    name = _name(source)
    report = report_of(model)
    heads = [p for p in report.passes if p.rewrite == HEAD.name]
    if heads and not dense_report(report):
        raise NotDenseError(f"{name} was rewritten without dense=True: its head gives one score vector per image, "
                            "not a map; make a dense copy with {make_dense_onnx}")
    x = image_input(model)
    axes = (1, 2) if is_channels_last(x) else (2, 3)
    fixed = [x.shape[a] for a in axes if x.shape is not None and a < len(x.shape) and isinstance(x.shape[a], int)]
    if fixed:
        what = "its head was made dense but its input" if heads else "it carries no dense head and its input"
        raise NotDenseError(f"{name} is not dense: {what} {x.name!r} has a fixed size "
                            f"({'x'.join(str(d if isinstance(d, int) else d.value) for d in x.shape)}), so it "
                            "cannot score images of other sizes; make a dense copy with {make_dense_onnx}")
    return model


def _name(source: OnnxModel) -> str:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else "the ONNX model"


def image_channels(source: OnnxModel | ir.Model) -> int:
    """The channels the model's image input declares (3 when it does not say)."""
    model = read_model(source)
    x = image_input(model)
    axis = 3 if is_channels_last(x) else 1
    d = x.shape[axis] if x.shape is not None and len(x.shape) > axis else None
    return d if isinstance(d, int) else 3


def _fixed_batch(model: ir.Model) -> int | None:
    """The batch size the image input is pinned to (an export without a dynamic batch), else None."""
    x = image_input(model)
    d = x.shape[0] if x.shape is not None and len(x.shape) > 0 else None
    return d if isinstance(d, int) else None


class SessionRunner:
    """Tiles through an onnxruntime session on the model (written to a temporary file unless it is one)."""

    def __init__(self, source: OnnxModel, model: ir.Model, walk: GraphWalk, provider: str) -> None:
        self.source, self.model, self.walk, self.provider = source, model, walk, provider
        self.tmp: tempfile.TemporaryDirectory | None = None
        self.dtype = torch.from_numpy(np.empty(0, walk.dtype)).dtype

    def __enter__(self) -> "SessionRunner":
        ep = execution_provider(self.provider)  # an unavailable provider fails before any work
        path = self.source
        if self.walk.frozen_pads or not isinstance(path, (str, os.PathLike)):
            self.tmp = tempfile.TemporaryDirectory(prefix="convify-dense-")
            path = Path(self.tmp.name) / "dense.onnx"
            write_model(_with_pads(self.model, self.walk.frozen_pads), path)
        self.session = open_session(path, ep)
        self.output = self.model.graph.outputs[0].name
        return self

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.permute(0, 2, 3, 1) if self.walk.channels_last else batch
        (out,) = self.session.run([self.output], {self.walk.input_name: np.ascontiguousarray(x.numpy())})
        return torch.from_numpy(out)

    def __exit__(self, *exc: Any) -> None:
        if self.tmp is not None:
            self.tmp.cleanup()


def _with_pads(model: ir.Model, frozen: dict[int, list[int]]) -> ir.Model:
    """A copy of ``model`` whose ``auto_pad`` SAME nodes at a stride over 1 pad explicitly as at the one-pass
    size (``model`` itself when there are none): every tile then pads as the whole image does."""
    if not frozen:
        return model
    copy = model.clone()
    for index, node in enumerate(copy.graph):
        if index in frozen:
            node.attributes["auto_pad"] = ir.AttrString("auto_pad", "NOTSET")
            node.attributes["pads"] = ir.AttrInt64s("pads", frozen[index])
    return copy


def scan_onnx(source: OnnxModel, image: Any, *, tile: int | None, batch_size: int | None, progress: bool,
              provider: str, normalize: tuple[Sequence[float], Sequence[float]] | None) -> Scan:
    """:func:`convify.dense.scan` of a dense ONNX model: the same plan and stitching, the tiles in onnxruntime."""
    model = read_dense(source)
    img = as_image(image, image_channels(model))
    channels, height, width = img.shape
    full = walk_graph(model, (height, width))
    if full.output is None or min(full.output) < 1:
        raise UsageError(f"an image of {height}x{width} pixels gives an empty map")
    budget_device = torch.device("cuda") if provider == "cuda" and torch.cuda.is_available() else torch.device("cpu")
    smallest = max(minimum_tile(a) for a in full.geometry.axes)
    per_pixel = ACTIVATION_FACTOR * walk_graph(model, (smallest, smallest)).peak_bytes / (smallest * smallest)
    if tile is None:
        tile = tile_for_budget(per_pixel, full.geometry, budget_device)
    elif tile < 1:
        raise UsageError(f"tile must be a positive number of pixels, not {tile}")
    plan = plan_tiles((height, width), full.output, full.geometry, tile)
    fixed_batch = _fixed_batch(model)
    if batch_size is None:
        batch_size = fixed_batch or batch_for_budget(per_pixel, plan, budget_device)
    elif batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, not {batch_size}")
    elif fixed_batch is not None and batch_size != fixed_batch:
        raise UsageError(f"batch_size={batch_size}: {_name(source)} takes batches of {fixed_batch} only (its input's "
                         f"first dimension is fixed); leave batch_size out")
    with SessionRunner(source, model, full, provider) as run:
        scores = run_and_stitch(plan, img, run, batch_size, normalize, Ranks.start(torch.device("cpu")), progress)
    return Scan(scores, img, plan, batch_size, f"onnxruntime ({provider})")
