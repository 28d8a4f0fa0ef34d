"""timm's "same" max pooling (``MaxPool2dSame``): the zero padding that stands in for its -inf padding, and
the check that a module really computes that pooling."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from convify.core import weights as W
from convify.core.rewrites.maxpool import PoolParams
from convify.errors import one_line


class PadSame(nn.Module):
    """Pads its input "same" for a window (``kernel``, ``stride``,
    ``dilation``) with zeros, the padding computed at run time from the input's size:
    ``max((ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)`` per dimension, the
    odd one on the right/bottom, as timm's ``pad_same`` does. Followed by a
    convolution with no padding of its own and this window, the output length
    is ``ceil(n / s)`` at every input size.

    ``replace_maxpool`` puts one before the convolution that replaces a
    "same" max pooling (timm's ``MaxPool2dSame``): zeros where the pooling
    padded with -inf. It has no parameters; torch.fx keeps it as one call and
    it exports to ONNX with dynamic height and width.

    >>> PadSame((3, 3), (2, 2))(torch.zeros(1, 1, 8, 7)).shape   # 8: pad 0+1, 7: pad 1+1
    torch.Size([1, 1, 9, 9])
    """

    convify_leaf = True  # a rewritten model retraces to the same graph

    def __init__(self, kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int] | None = None) -> None:
        super().__init__()
        self.kernel = tuple(kernel)
        self.stride = tuple(stride)
        self.dilation = tuple(dilation) if dilation is not None else (1,) * len(self.kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad: list = []
        spatial = x.shape[2:]
        for i in reversed(range(len(self.kernel))):  # F.pad takes the last dimension first
            total = W.same_pad_total(spatial[i], self.kernel[i], self.stride[i], self.dilation[i])
            pad += [total // 2, total - total // 2]
        return F.pad(x, pad)

    def extra_repr(self) -> str:
        text = f"kernel={self.kernel}, stride={self.stride}"
        return text + (f", dilation={self.dilation}" if any(d != 1 for d in self.dilation) else "")


def same_pool_mismatch(module: nn.Module, params: PoolParams) -> str | None:
    """Why ``module`` does not compute what ``params`` describe, or None.

    Its class and forward were matched by identity; this checks the
    behaviour too (a timm release that pads differently would fail here):
    the module and :meth:`PoolParams.pool` on small random inputs, at a length
    of every residue modulo the stride in each dimension, including lengths
    shorter than the window.
    """
    g = torch.Generator().manual_seed(0)
    span = [d * (k - 1) + 1 for k, d in zip(params.kernel, params.dilation)]
    for extra in range(max(span) + max(params.stride)):
        size = tuple(1 + (extra + i) % (sp + s) for i, (sp, s) in enumerate(zip(span, params.stride)))
        x = torch.randn(1, 2, *size, generator=g)
        try:
            with torch.no_grad():
                got, want = module(x), params.pool(x)
        except Exception as e:  # noqa: BLE001  (any failure: not the pooling convify knows)
            return f"{type(module).__name__} did not run as a 'same' max pooling on a {size} input ({one_line(e)})"
        if not isinstance(got, torch.Tensor) or got.shape != want.shape or not torch.equal(got, want):
            return (f"{type(module).__name__} does not compute timm's 'same' max pooling (-inf padding, then "
                    f"max pooling with no padding) on a {size} input; convify cannot tell which borders it uses")
    return None
