"""Pure weight and shape math, testable without torch.fx.

Everything here takes numbers or tensors and returns numbers or tensors.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

Ints = tuple[int, ...]


def ntuple(value: int | Sequence[int], n: int) -> Ints:
    """``3 -> (3, 3)``; a sequence is checked for length ``n``."""
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) == 1:
        return value * n
    if len(value) != n:
        raise ValueError(f"expected {n} values, got {value}")
    return value


def pool_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    """Output length of a max pooling along one dimension, as PyTorch computes it
    (including the ceil_mode rule that the last window must start inside the
    input or its left padding)."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int, extra: int = 0) -> int:
    """Output length of a convolution along one dimension, with ``extra``
    zeros appended on the right/bottom."""
    return (size + 2 * padding + extra - dilation * (kernel - 1) - 1) // stride + 1


def ceil_mode_extra_pad(kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Zeros to append on the right so that a strided convolution's output
    length equals a ``ceil_mode=True`` pool's at every input length.

    ``stride - 1`` alone lets a last window start in the right padding, which
    PyTorch's pooling forbids; ``dilation * (kernel - 1) - padding`` is exactly
    the room for windows that start at most at the input's last element.
    """
    return max(0, min(stride - 1, dilation * (kernel - 1) - padding))


def average_weight(channels: int, kernel: Sequence[int], *, depthwise: bool, dtype: torch.dtype | None = None,
                   device: torch.device | None = None) -> torch.Tensor:
    """Weight of a convolution that computes average pooling over ``kernel``:
    ``1 / prod(kernel)`` on each channel's own taps, zero across channels.

    Dense: shape ``(C, C, *kernel)``; depthwise (``groups=C``): ``(C, 1, *kernel)``.
    """
    taps = math.prod(kernel)
    if depthwise:
        return torch.full((channels, 1, *kernel), 1.0 / taps, dtype=dtype, device=device)
    weight = torch.zeros((channels, channels, *kernel), dtype=dtype, device=device)
    idx = torch.arange(channels, device=device)
    weight[idx, idx] = 1.0 / taps
    return weight


def linear_to_conv_weight(weight: torch.Tensor, in_channels: int, spatial: Sequence[int]) -> torch.Tensor:
    """A Linear's ``(K, C*H*W)`` weight as the ``(K, C, H, W)`` weight of the
    convolution that computes it on the unflattened ``(C, H, W)`` map.

    ``torch.flatten`` orders features channel-major, exactly the layout of a
    convolution kernel, so this is a reshape.
    """
    k, features = weight.shape
    expected = in_channels * math.prod(spatial)
    if features != expected:
        raise ValueError(f"Linear has {features} input features, the map has {in_channels}x"
                         f"{'x'.join(map(str, spatial))} = {expected}")
    return weight.reshape(k, in_channels, *spatial)


def linear_to_pointwise_weight(weight: torch.Tensor, dims: int) -> torch.Tensor:
    """A Linear's ``(K, C)`` weight as a 1x1 (x1) convolution weight."""
    return weight.reshape(*weight.shape, *([1] * dims))
