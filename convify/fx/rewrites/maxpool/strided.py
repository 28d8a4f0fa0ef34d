"""The strided convolution that stands for a max pooling: shared by the
``conv`` and ``depthwise`` modes (and ``fold`` where it cannot fold)."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from convify.core import weights as W
from convify.core.report import Replaced
from convify.core.rewrites.maxpool import SPEC, MaxPoolOptions, PoolParams, PoolRecord, fmt
from convify.fx import nodes, ops
from convify.fx.rewrites.base import Site
from convify.fx.rewrites.maxpool.modes import device_at, new_module_target, site_input, site_shapes, swap_in
from convify.fx.rewrites.maxpool.same import PadSame


def strided_conv(gm: fx.GraphModule, site: Site[PoolParams], options: MaxPoolOptions, *, mode: str,
                 depthwise: bool, notes: tuple[str, ...] = (), fold_blocker: str | None = None) -> Replaced:
    """Replace the site by ``ConvNd(C, C, k, s, p, d)`` (``groups=C`` when
    ``depthwise``), initialized as ``options.init`` says, behind explicit
    padding for ``ceil_mode`` and for a "same" pooling."""
    params = site.params
    node = site.node
    inp, out = site_shapes(site)
    channels = inp.shape[1]
    # skip_init: the constructor's own random init would be thrown away at once (it was a
    # third of replace_maxpool's time on googlenet, whose pools have up to 832 channels)
    conv = nn.utils.skip_init(ops.CONV_MODULES[params.dims], channels, channels, params.kernel, stride=params.stride,
                              padding=params.padding, dilation=params.dilation, groups=channels if depthwise else 1,
                              bias=True, device=device_at(gm, node, inp), dtype=inp.dtype)
    _initialize(conv, params, channels, depthwise, options.init)
    target, training = new_module_target(gm, site)
    conv.train(training)
    nodes.set_submodule(gm, target, conv)

    graph = gm.graph
    with graph.inserting_before(node):
        source = site_input(node)
        if params.same:  # zeros where the pooling padded with -inf: the average then counts them
            pad_target = nodes.free_name(gm, f"{target}_pad")
            nodes.set_submodule(gm, pad_target, PadSame(params.kernel, params.stride, params.dilation).train(training))
            source = graph.call_module(pad_target, (source,))
            source.meta = {}
        extra = params.extra_pad
        if any(extra):
            source = graph.call_function(F.pad, (source, tuple(v for e in reversed(extra) for v in (0, e))))
            source.meta = {}
        new = graph.call_module(target, (source,))
    swap_in(gm, site, new)
    return Replaced(SPEC.name, site.name, site.op, _describe(type(conv).__name__, channels, params, depthwise),
                    inp.shape, out.shape if out else None, exact=False, module=target, notes=notes,
                    detail=PoolRecord(params, mode, conv=target, depthwise=depthwise, fold_blocker=fold_blocker))


def _describe(conv: str, channels: int, params: PoolParams, depthwise: bool) -> str:
    text = f"{conv}({channels}, {channels}, k={fmt(params.kernel)}, s={fmt(params.stride)}"
    if any(params.padding):
        text += f", p={fmt(params.padding)}"
    if any(d != 1 for d in params.dilation):
        text += f", d={fmt(params.dilation)}"
    if depthwise:
        text += f", groups={channels}"
    if any(params.extra_pad):
        text += f", +pad {fmt(params.extra_pad)}"
    if params.same:
        text += ", +pad same"
    return text + ")"


def _initialize(conv: nn.Module, params: PoolParams, channels: int, depthwise: bool, init: str) -> None:
    with torch.no_grad():
        if init == "kaiming":
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="linear")
        else:  # "avg", and the starting point of "fit"; a new Parameter: no copy of a large weight
            conv.weight = nn.Parameter(W.average_weight(channels, params.kernel, depthwise=depthwise,
                                                        dtype=conv.weight.dtype, device=conv.weight.device))
        conv.bias.zero_()
