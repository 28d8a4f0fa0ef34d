"""``mode="exact"``: the ``MaxPool`` node becomes convolutions and ReLUs that
compute it exactly (up to float rounding), built from the core's weights
(:mod:`convify.core.maxtree`), the same trees as the torch.fx frontend's:

* ``exact_form="chain"`` (the default): per axis of the window, last axis
  first, a chain of depthwise ``Conv`` nodes, ``Add`` and ``Relu``:
  ``t = Relu(Conv_0(z))``, ``t = Relu(Add(Conv_i(z), t))``, ...,
  ``max = Add(Conv_{k-1}(z), t)`` (:func:`~convify.core.maxtree.depthwise_chain`);
* ``"separable"`` and ``"direct"``: ``Conv`` and ``Relu`` nodes only
  (:func:`~convify.core.maxtree.max_tree`), values carried as channels,
  one per value on an input proven >= 0, two on a signed one: the form
  neural-network verifiers take.

``grouped=False`` writes every ``Conv`` with ``group=1`` and block-diagonal
weights (:func:`~convify.core.maxtree.ungrouped_weight`), for tools that take
no grouped convolution.

Borders. ONNX's ``Conv`` pads each side on its own, so on an input proven
>= 0 (:mod:`convify.onnx.nonnegative`) every zero of the padding,
``ceil_mode``'s extra windows included, goes inside the pads of the
convolutions that read the pooled axis (those whose kernel spans it): no
``Pad`` node, no leading zero taps (PyTorch needs those:
:func:`~convify.core.maxtree.zeros_inside`). A signed input is padded first
with copies of valid taps (:mod:`.borders`). Float16 and bfloat16 are
skipped: the tree's differences would round in half precision.

Generated graph (``MaxPool[kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]]`` after a Relu)::

    %pool/exact/axis1_0 = Conv[kernel_shape=[1, 3], strides=[1, 2], pads=[0, 1, 0, 1], group=64](%r, ...)
    %pool/exact/axis1_0_relu = Relu(%pool/exact/axis1_0)
    %pool/exact/axis1_1 = Conv[...](%r, ...)
    %pool/exact/axis1_1_add = Add(%pool/exact/axis1_1, %pool/exact/axis1_0_relu)
    ...                                     # then axis 0: kernel [3, 1], strides [2, 1], pads [1, 0, 1, 0]
    %p = Add(%pool/exact/axis0_2, %pool/exact/axis0_1_relu)
"""
from __future__ import annotations

import math
from typing import Sequence

import onnx_ir as ir
import torch

from convify.core import maxtree
from convify.core import weights as W
from convify.core.maxtree import TreeForm
from convify.core.report import Replaced
from convify.core.rewrites.maxpool import EXACT, SPEC, ExactTree, MaxPoolOptions, PoolRecord
from convify.onnx.building import GraphEditor
from convify.onnx.rewrites.base import Site
from convify.onnx.rewrites.maxpool.borders import copy_borders, dynamic_residue_reason
from convify.onnx.rewrites.maxpool.modes import (OnnxPoolMode, dtype_reason, numpy_dtype, onnx_pool_mode,
                                                 replaced_notes)
from convify.onnx.rewrites.maxpool.window import PoolSite

FLOATS = (ir.DataType.FLOAT, ir.DataType.DOUBLE)

ZEROS = "zero padding (exact: the input is >= 0 and every window holds a valid tap), inside the convolutions' pads"

Spatial = tuple[int, ...] | None


@onnx_pool_mode(EXACT)
class Exact(OnnxPoolMode):
    def skip_reason(self, site: Site[PoolSite], options: MaxPoolOptions) -> str | None:
        return (dtype_reason(site, FLOATS, " (the tree's differences would round in half precision)")
                or (dynamic_residue_reason(site.params) if site.params.signed else None))

    def apply(self, edit: GraphEditor, site: Site[PoolSite], options: MaxPoolOptions) -> Replaced:
        pool, node = site.params, site.node
        params = pool.params
        base = f"{site.name}/exact"
        first = len(edit.added)
        padded = any(pool.pads_begin) or any(pool.pads_end)
        z, spatial = node.inputs[0], pool.spatial
        if pool.signed and padded:
            z, padding = copy_borders(edit, z, pool, base)
            spatial = _grown(spatial, pool.pads_begin, pool.pads_end)
        else:
            padding = ZEROS if padded else "no padding"
        tree = _Tree(edit, pool, numpy_dtype(site), options.grouped, base, inside=padded and not pool.signed)
        if options.form is TreeForm.CHAIN:
            out = tree.chains(z, spatial, maxtree.depthwise_chain(params.kernel, params.stride, params.dilation))
        else:
            out = tree.layers(z, spatial, maxtree.max_tree(params.kernel, params.stride, params.dilation,
                                                            signed=pool.signed, form=options.form))
        notes = replaced_notes(edit, site, first)
        edit.replace(node, edit.added[first:], out)
        record = ExactTree(form=options.form, signed=pool.signed, padding=padding, channels=tuple(tree.channels),
                           relu_levels=tree.relus, parameters=tree.parameters, macs=tree.macs or 0,
                           sign_proof=pool.sign_proof, grouped=options.grouped)
        if tree.macs is None:
            notes += ("MACs not counted: the input's spatial size is not static",)
        levels = "ReLU level" if record.relu_levels == 1 else "ReLU levels"
        ungrouped = "" if options.grouped else ", ungrouped"
        text = (f"exact max tree ({options.form.value}{ungrouped}, {record.relu_levels} {levels}, "
                f"{'signed' if record.signed else '>=0'})")
        return Replaced(SPEC.name, site.name, site.op, text, site.in_shape, site.out_shape, exact=True,
                        module=base, notes=(record.describe(), *notes),
                        detail=PoolRecord(params, EXACT.name, tree=record))

    def finish(self, rows: Sequence[Replaced], options: MaxPoolOptions) -> list[str]:
        if options.init == "avg" or not rows:
            return []
        return [f"init={options.init!r} does not apply to mode='exact': its weights are set to compute the max "
                "pooling exactly (nothing to draw or fit)"]


def _grown(spatial: Sequence[int | None], begin: Sequence[int], end: Sequence[int]) -> tuple[int | None, ...]:
    return tuple(None if n is None else n + b + e for n, b, e in zip(spatial, begin, end))


class _Tree:
    """Writes one site's convolutions, ReLUs and additions through an
    editor, counting what the record states: channels per pooled channel of
    each convolution, ReLUs on the path, parameters, MACs per image (None
    when a size is dynamic)."""

    def __init__(self, edit: GraphEditor, pool: PoolSite, dtype: type, grouped: bool, base: str, *,
                 inside: bool) -> None:
        self.edit, self.pool, self.dtype, self.grouped, self.base = edit, pool, dtype, grouped, base
        self.inside = inside  # zero padding inside the convolutions that read the pooled axes
        self.channels: list[int] = []
        self.relus = 0
        self.parameters = 0
        self.macs: int | None = 0

    def chains(self, z: ir.Value, spatial: Spatial, chains: list[tuple[int, list[maxtree.ChainStep]]]) -> ir.Value:
        for axis, steps in chains:
            t: ir.Value | None = None
            out_spatial = spatial
            for i, step in enumerate(steps):
                name = f"{self.base}/axis{axis}_{i}"
                u, out_spatial = self._conv(z, spatial, step.weight, step.stride, step.dilation, name)
                if t is not None:
                    t = self.edit.node("Add", [u, t], None, f"{name}_add").outputs[0]
                else:
                    t = u
                if step.relu:
                    t = self._relu(t, f"{name}_relu")
            z, spatial = t, out_spatial
        return z

    def layers(self, z: ir.Value, spatial: Spatial, layers: list[maxtree.TreeLayer]) -> ir.Value:
        for i, layer in enumerate(layers):
            z, spatial = self._conv(z, spatial, layer.weight, layer.stride, layer.dilation, f"{self.base}/conv{i}")
            if layer.relu:
                z = self._relu(z, f"{self.base}/relu{i}")
        return z

    def _relu(self, x: ir.Value, name: str) -> ir.Value:
        self.relus += 1
        return self.edit.node("Relu", [x], None, name).outputs[0]

    def _conv(self, z: ir.Value, spatial: Spatial, one: torch.Tensor, stride: Sequence[int],
              dilation: Sequence[int], name: str) -> tuple[ir.Value, Spatial]:
        """One convolution of one channel's ``(out, in, *kernel)`` weight ``one``, over every channel."""
        c = self.pool.channels
        weight = maxtree.channel_weight(one, c, grouped=self.grouped).numpy().astype(self.dtype)
        kernel = tuple(one.shape[2:])
        spans = [k > 1 for k in kernel]  # the pooled axes this convolution reads: their zeros are its pads
        begin = [b if self.inside and s else 0 for b, s in zip(self.pool.pads_begin, spans)]
        end = [e if self.inside and s else 0 for e, s in zip(self.pool.pads_end, spans)]
        conv = self.edit.node("Conv", [z, self.edit.initializer(f"{name}.weight", weight)], {
            "kernel_shape": list(kernel), "strides": list(stride), "dilations": list(dilation),
            "pads": begin + end, "group": c if self.grouped else 1}, name)
        self.channels.append(weight.shape[0] // c)
        self.parameters += weight.size
        out = None if spatial is None or None in spatial else tuple(
            W.conv_output_size(n, k, s, 0, d, extra=b + e)
            for n, k, s, d, b, e in zip(spatial, kernel, stride, dilation, begin, end))
        if out is None or self.macs is None:
            self.macs = None
        else:
            self.macs += math.prod(out) * weight.shape[0] * math.prod(weight.shape[1:])
        return conv.outputs[0], out
