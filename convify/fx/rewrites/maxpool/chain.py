"""The depthwise form of an exact max tree as a module: chains of depthwise
convolutions and additions (:func:`convify.core.maxtree.depthwise_chain`).

Each step adds the previous step's output, which an ``nn.Sequential`` cannot
say, so the tree is a ``torch.fx.GraphModule`` (a torch class: a model that
holds it still pickles and loads without convify, and hooks, ``state_dict``
and ``print`` see one module at the pool's name). It holds ``nn.ConvNd``
layers only (``groups=C``, one channel in and one out per group, under ``axis<i>``
for spatial axis ``i``, and the border's ``pad`` where there is one); its
graph calls them, ``+`` and ``torch.relu``. onnxruntime fuses each step into
one NCHWc depthwise convolution with its sum and ReLU, which is why this form
is the default (:mod:`.exact` says what it bought).

Generated code (resnet18's ``MaxPool2d(3, 2, 1)`` after a ReLU)::

    def forward(self, input):
        axis1_0 = getattr(self.axis1, "0")(input)            # Conv2d(64, 64, (1, 3), s=(1, 2), p=(0, 1), groups=64)
        relu = torch.relu(axis1_0)
        axis1_1 = getattr(self.axis1, "1")(input);  add = axis1_1 + relu;  relu_1 = torch.relu(add)
        axis1_2 = getattr(self.axis1, "2")(input);  add_1 = axis1_2 + relu_1
        axis0_0 = getattr(self.axis0, "0")(add_1)            # the same along the height, (3, 1), s=(2, 1)
        ...
        return add_3
"""
from __future__ import annotations

import operator
from typing import Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from convify.core import maxtree
from convify.fx import ops

#: The class name a depthwise tree prints with (``print(model)``); its class is torch.fx's.
CLASS_NAME = "DepthwiseMaxTree"


def depthwise_max_tree(dims: int, kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int],
                       channels: int, *, pad: nn.Module | None = None, padding: Sequence[int] | None = None,
                       extra: Sequence[int] | None = None,
                       dtype: torch.dtype, device: torch.device | None = None, grouped: bool = True) -> fx.GraphModule:
    """The tree over ``channels`` channels: ``pad`` (or None), then per axis
    ``t = conv_0(z)``, ``t = conv_i(z) + t`` for each next convolution, a ReLU
    after every step but the last; a chain's output is the next one's ``z``.
    ``padding``: zeros inside the convolutions (an input >= 0 only);
    ``extra``: ceil_mode's right zeros, inside them too.
    ``grouped=False``: ordinary convolutions with diagonal weights.

    >>> tree = depthwise_max_tree(2, (3, 3), (2, 2), (1, 1), 4, padding=(1, 1), dtype=torch.float32)
    >>> x = torch.rand(1, 4, 9, 9)
    >>> torch.allclose(tree(x), torch.nn.functional.max_pool2d(x, 3, 2, 1))
    True
    """
    root = nn.Module()
    graph = fx.Graph()
    z = graph.placeholder("input")
    if pad is not None:
        root.pad = pad
        z = graph.call_module("pad", (z,))
    for axis, steps in maxtree.depthwise_chain(kernel, stride, dilation, padding=padding, extra=extra):
        name = f"axis{axis}"
        root.add_module(name, nn.ModuleList(_conv(step, dims, channels, dtype, device, grouped)
                                             for step in steps))
        t = None
        for i, step in enumerate(steps):
            u = graph.call_module(f"{name}.{i}", (z,))
            t = u if t is None else graph.call_function(operator.add, (u, t))
            if step.relu:
                t = graph.call_function(torch.relu, (t,))
        z = t
    graph.output(z)
    return fx.GraphModule(root, graph, class_name=CLASS_NAME)


def _conv(step: maxtree.ChainStep, dims: int, channels: int, dtype: torch.dtype,
          device: torch.device | None, grouped: bool) -> nn.Module:
    # skip_init: the default random init would be overwritten at once
    conv = nn.utils.skip_init(ops.CONV_MODULES[dims], channels, channels, tuple(step.weight.shape[2:]),
                              stride=step.stride, padding=step.padding, dilation=step.dilation,
                              groups=channels if grouped else 1, bias=False, device=device, dtype=dtype)
    conv.weight = nn.Parameter(maxtree.channel_weight(step.weight, channels, grouped=grouped, dtype=dtype,
                                                      device=device))
    return conv


def relu_levels(tree: nn.Module) -> int:
    """ReLUs on a path through a built tree: its ``nn.ReLU`` layers (the
    ``Sequential`` forms) or its graph's ``torch.relu`` calls (the depthwise form)."""
    if isinstance(tree, fx.GraphModule):
        return sum(n.op == "call_function" and n.target is torch.relu for n in tree.graph.nodes)
    return sum(isinstance(m, nn.ReLU) for m in tree.modules())
