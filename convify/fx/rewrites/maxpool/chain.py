"""The depthwise form of an exact max tree as a module: chains of depthwise
convolutions and additions (:func:`convify.core.maxtree.depthwise_chain`).

Why a module of its own, not an ``nn.Sequential``: each step adds the previous
step's output, which a ``Sequential`` cannot say. What runs is standard
layers and tensor operations only: ``nn.ConvNd`` (``groups=C``, one channel in
and one out per group), ``+`` and ``torch.relu``; onnxruntime fuses each step
into one NCHWc depthwise convolution with its sum and ReLU, which is why this
form is the default (:mod:`.exact` says what it bought).

Generated code (resnet18's ``MaxPool2d(3, 2, 1)`` after a ReLU)::

    maxpool = self.maxpool(relu)   # DepthwiseMaxTree: per axis, t = relu(conv_0(z)); t = relu(conv_1(z) + t);
                                   #   z = conv_2(z) + t; each Conv2d(64, 64, 1x3 then 3x1, groups=64)
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from convify.core import maxtree
from convify.fx import ops


class DepthwiseMaxTree(nn.Module):
    """``pad`` (or None), then per axis a chain of depthwise convolutions:
    ``t = conv_0(z)``, then ``t = conv_i(z) + t`` for each next one, a ReLU
    after every step but the last; the chain's output is the next one's ``z``.

    >>> tree = DepthwiseMaxTree.build(2, (3, 3), (2, 2), (1, 1), 4, padding=(1, 1), dtype=torch.float32)
    >>> x = torch.rand(1, 4, 9, 9)
    >>> torch.allclose(tree(x), torch.nn.functional.max_pool2d(x, 3, 2, 1))
    True
    """

    convify_leaf = True  # one call per site: a rewritten model retraces to the same graph

    def __init__(self, pad: nn.Module | None, chains: Sequence[Sequence[nn.Module]],
                 relus: Sequence[Sequence[bool]]) -> None:
        super().__init__()
        self.pad = pad
        self.chains = nn.ModuleList(nn.ModuleList(chain) for chain in chains)
        self.relus = tuple(tuple(bool(r) for r in chain) for chain in relus)

    @classmethod
    def build(cls, dims: int, kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int],
              channels: int, *, pad: nn.Module | None = None, padding: Sequence[int] | None = None,
              dtype: torch.dtype, device: torch.device | None = None) -> "DepthwiseMaxTree":
        """The tree over ``channels`` channels; ``padding``: zeros inside the
        convolutions (an input >= 0 only); ``pad``: a module before them."""
        chains, relus = [], []
        for steps in maxtree.depthwise_chain(kernel, stride, dilation, padding=padding):
            convs = []
            for step in steps:
                # skip_init: the default random init would be overwritten at once
                conv = nn.utils.skip_init(ops.CONV_MODULES[dims], channels, channels, tuple(step.weight.shape[2:]),
                                          stride=step.stride, padding=step.padding, dilation=step.dilation,
                                          groups=channels, bias=False, device=device, dtype=dtype)
                conv.weight = nn.Parameter(maxtree.grouped_weight(step.weight, channels, dtype=dtype, device=device))
                convs.append(conv)
            chains.append(convs)
            relus.append([step.relu for step in steps])
        return cls(pad, chains, relus)

    @property
    def relu_levels(self) -> int:
        return sum(sum(chain) for chain in self.relus)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.pad(x) if self.pad is not None else x
        for convs, relus in zip(self.chains, self.relus):
            t = None
            for conv, relu in zip(convs, relus):
                t = conv(z) if t is None else conv(z) + t
                if relu:
                    t = torch.relu(t)
            z = t
        return z

    def extra_repr(self) -> str:
        return f"relus={self.relus}"
