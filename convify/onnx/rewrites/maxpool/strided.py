"""``mode="conv"`` and ``mode="depthwise"``: the ``MaxPool`` node becomes one
``Conv`` with its window, strides, dilations and pads, the paper's learnable
pooling: ``C -> C`` channels, or ``group=C`` for depthwise.

ONNX's ``Conv`` pads each side on its own, so the pooling's pads go in as
they are, ``ceil_mode``'s extra windows as more zeros after the input
(``PoolParams.extra_pad``): no ``Pad`` node. Weights (``init``):

* ``avg``: :func:`convify.core.weights.average_weight`, ``1 / prod(kernel)``
  on each channel's own taps (PyTorch's and convify's average-pooling init):
  the convolution is an ``AveragePool`` with ``count_include_pad=1`` (zeros
  of the padding counted); a start from which a model is trained or fitted,
  not a max pooling;
* ``kaiming``: drawn from ``N(0, 1 / fan_in)`` (``torch.nn.init.kaiming_normal_``, linear gain).

The bias is zero. Generated graph, before and after::

    %p = MaxPool[kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]](%r)
    %p = Conv[kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], group=1](%r, %pool/conv.weight, %pool/conv.bias)
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch

from convify.core import weights as W
from convify.core.report import Replaced
from convify.core.rewrites.maxpool import CONV, DEPTHWISE, SPEC, MaxPoolOptions, PoolRecord, fmt
from convify.onnx.building import GraphEditor
from convify.onnx.rewrites.base import Site
from convify.onnx.rewrites.maxpool.modes import (OnnxPoolMode, dtype_reason, numpy_dtype, onnx_pool_mode,
                                                 replaced_notes)
from convify.onnx.rewrites.maxpool.window import PoolSite

FLOATS = (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16)


class _Strided(OnnxPoolMode):
    depthwise = False

    def skip_reason(self, site: Site[PoolSite], options: MaxPoolOptions) -> str | None:
        return dtype_reason(site, FLOATS)

    def apply(self, edit: GraphEditor, site: Site[PoolSite], options: MaxPoolOptions) -> Replaced:
        return strided_conv(edit, site, options, mode=self.mode.name, depthwise=self.depthwise)


@onnx_pool_mode(CONV)
class Conv(_Strided):
    depthwise = False


@onnx_pool_mode(DEPTHWISE)
class Depthwise(_Strided):
    depthwise = True


def strided_conv(edit: GraphEditor, site: Site[PoolSite], options: MaxPoolOptions, *, mode: str,
                 depthwise: bool) -> Replaced:
    """Replace the site by one ``Conv`` (``group=C`` when ``depthwise``) initialized as ``options.init`` says."""
    pool, node = site.params, site.node
    params, channels, dtype = pool.params, pool.channels, numpy_dtype(site)
    weight = _initial_weight(channels, params.kernel, depthwise, options.init).astype(dtype)
    base = f"{site.name}/{mode}"
    first = len(edit.added)
    inputs = [node.inputs[0], edit.initializer(f"{base}.weight", weight),
              edit.initializer(f"{base}.bias", np.zeros(channels, dtype))]
    conv = edit.node("Conv", inputs, {
        "kernel_shape": list(params.kernel), "strides": list(params.stride), "dilations": list(params.dilation),
        "pads": [*pool.pads_begin, *pool.pads_end], "group": channels if depthwise else 1}, base)
    notes = replaced_notes(edit, site, first)
    edit.replace(node, [conv], conv.outputs[0])
    return Replaced(SPEC.name, site.name, site.op, _describe(pool, depthwise), site.in_shape, site.out_shape,
                    exact=False, module=conv.name, notes=notes,
                    detail=PoolRecord(params, mode, conv=conv.name, depthwise=depthwise))


def _initial_weight(channels: int, kernel: tuple[int, ...], depthwise: bool, init: str) -> np.ndarray:
    if init == "kaiming":
        weight = torch.empty(channels, 1 if depthwise else channels, *kernel, dtype=torch.float64)
        torch.nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity="linear")
        return weight.numpy()
    return W.average_weight(channels, kernel, depthwise=depthwise, dtype=torch.float64).numpy()


def _describe(pool: PoolSite, depthwise: bool) -> str:
    params, channels = pool.params, pool.channels
    text = f"Conv({channels}, {channels}, k={fmt(params.kernel)}, s={fmt(params.stride)}"
    if any(pool.pads_begin) or any(pool.pads_end):
        text += f", pads={fmt(pool.pads_begin)}/{fmt(pool.pads_end)}"
    if any(d != 1 for d in params.dilation):
        text += f", d={fmt(params.dilation)}"
    if depthwise:
        text += f", group={channels}"
    return text + ")"
