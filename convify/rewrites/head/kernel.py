"""The convolution a head's Linear becomes in 2-D: on CPU, one matrix multiply."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


class HeadConv2d(nn.Conv2d):
    """The ``Conv2d`` a Linear becomes: on CPU it runs as one matrix multiply.

    oneDNN's direct convolution is 2-3x slower than a GEMM on a head's shapes
    (a 6x6 kernel over 8x8 positions, 1x1 over 4096 channels); ``unfold`` +
    ``addmm`` computes the same sums, with the very GEMM the Linear ran at the
    native size. Exported (ONNX, ``torch.export``), compiled, scripted, traced
    and on other devices it is a plain convolution: ONNX sees ``Conv``.
    """

    convify_leaf = True  # convify's tracer records it as one module call, never its insides

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _plain_convolution_wanted(x) or self.padding_mode != "zeros" or self.groups != 1:
            return super().forward(x)
        return conv2d_as_matmul(x, self.weight, self.bias, self.stride, self.padding, self.dilation)


def _plain_convolution_wanted(x: torch.Tensor) -> bool:
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return True
    if torch.compiler.is_compiling():
        return True
    # a torch.fx Proxy, or a fake/functional tensor of an exporter: record a plain convolution
    return type(x) is not torch.Tensor or x.device.type != "cpu"


def conv2d_as_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     stride: tuple[int, ...] = (1, 1), padding: Any = (0, 0),
                     dilation: tuple[int, ...] = (1, 1)) -> torch.Tensor:
    """``F.conv2d`` (groups=1) as ``unfold`` and one ``(N*L, C*k*k) @ (C*k*k, K)`` GEMM."""
    n, _, h, w = x.shape
    k, c, kh, kw = weight.shape
    if isinstance(padding, str):
        return F.conv2d(x, weight, bias, stride, padding, dilation)
    out_h = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    positions = out_h * out_w
    if (kh, kw) == (1, 1) and tuple(stride) == (1, 1) and not any(padding):
        cols = x.reshape(n, c, positions)
    else:
        cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (N, C*kh*kw, L)
    flat_weight = weight.reshape(k, -1)
    if n == 1 or positions >= _MIN_POSITIONS:
        # channel-major (K, F) @ (F, L) per image: the result is already (N, K, H', W'), no copies
        if n == 1:
            out = flat_weight @ cols[0] if bias is None else torch.addmm(bias[:, None], flat_weight, cols[0])
            return out.view(1, k, out_h, out_w)
        out = flat_weight @ cols
        return (out if bias is None else out + bias[:, None]).view(n, k, out_h, out_w)
    # few positions, many images (the native size): one (N*L, F) @ (F, K) GEMM, the Linear's own
    rows = cols.transpose(1, 2).reshape(n * positions, -1)
    out = rows @ flat_weight.t() if bias is None else torch.addmm(bias, rows, flat_weight.t())
    return out.view(n, out_h, out_w, k).permute(0, 3, 1, 2).contiguous()


_MIN_POSITIONS = 16  # from here on a GEMM per image is as fast as one over all positions
