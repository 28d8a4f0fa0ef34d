"""Pure weight and shape math, testable without torch.fx.

Everything here takes numbers or tensors and returns numbers or tensors.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from convify.wording import counted

Ints = tuple[int, ...]


def ntuple(value: int | Sequence[int], n: int) -> Ints:
    """``3 -> (3, 3)``; a sequence is checked for length ``n``."""
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) == 1:
        return value * n
    if len(value) != n:
        raise ValueError(f"expected {counted(n, 'value')}, got {value}")
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
    ``padding`` is the padding after the input (PyTorch pads both sides
    alike; ONNX's ``pads`` end, whose ``ceil_mode`` ignores windows that would
    start in the right padding, the same rule).
    """
    return max(0, min(stride - 1, dilation * (kernel - 1) - padding))


def same_pad_total(size, kernel: int, stride: int, dilation: int = 1):
    """Zeros (or -inf) a "same" pooling or convolution adds along one dimension
    of length ``size``, as TensorFlow and timm's ``get_same_padding`` compute it:
    ``max((ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)``,
    which makes the output length ``ceil(size / stride)``.

    ``size`` may be an int, a ``torch.SymInt`` (torch.export, the dynamo ONNX
    exporter) or a 0-d tensor (the legacy exporter's traced sizes): written
    with ``%``, ``//`` of non-negative values and no ``max``, so the padding
    stays a function of the input size in an exported graph made of
    Add/Sub/Mul/Div/Mod on shapes (a ``max`` there would be an ONNX ``Max``,
    which an exact model's census must not hold). Split it as ``left = total
    // 2``, ``right = total - left`` (:func:`same_padding`).
    """
    span = dilation * (kernel - 1) + 1
    short = (stride - size % stride) % stride  # ceil(size / s) * s - size, in [0, s - 1]
    if span >= stride:  # never negative: nothing to clamp
        return span - stride + short
    # span < stride: the total is max(0, short - (stride - span)). short + span >= stride exactly when that
    # is positive, and short + span < 2 stride, so (short + span) // stride is its 0/1 indicator
    return (short + span - stride) * ((short + span) // stride)


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """(left, right) padding of a "same" pooling along one dimension; the odd
    one goes right, as in timm's ``pad_same``."""
    total = same_pad_total(size, kernel, stride, dilation)
    return total // 2, total - total // 2


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


# --------------------------------------------------------------------------- least-squares fit (init="fit")


def patches(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
            dilation: Sequence[int]) -> torch.Tensor:
    """im2col for 1-, 2- or 3-d inputs: ``(N, C, *spatial)`` -> ``(M, C, K)``.

    Row ``m`` holds the zero-padded window that a convolution with these
    parameters reads for output position ``m`` (batch-major, then spatial
    positions in order); ``K = prod(kernel)`` taps in the order of a
    convolution weight's trailing dimensions, so a dense weight
    ``(C_out, C, *kernel)`` applies as ``rows.reshape(M, C*K) @ w.reshape(C_out, -1).T``.
    """
    dims = len(kernel)
    pad = tuple(v for p in reversed(padding) for v in (p, p))
    x = torch.nn.functional.pad(x, pad) if any(padding) else x
    for i, (k, s, d) in enumerate(zip(kernel, stride, dilation)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)  # appends a window dimension
        if d != 1:
            x = x[..., ::d]
    # (N, C, *out, *kernel) -> (N, *out, C, *kernel) -> (M, C, K)
    n, c = x.shape[:2]
    order = (0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims))
    return x.permute(order).reshape(-1, c, math.prod(kernel))


def ridge_solve(gram: torch.Tensor, cross: torch.Tensor, prior: torch.Tensor, ridge: float) -> torch.Tensor:
    """Solve ``(G + lam*D) w = B + lam*D*prior`` for ``w`` (batched over leading dims).

    ``gram`` is ``X^T X`` (``(..., F, F)``), ``cross`` is ``X^T Y`` (``(..., F, O)``),
    ``prior`` (``(..., F, O)``) is what the solution shrinks toward (the
    average-pooling weights, so little data means little change). ``D`` is the
    identity without its last entry (the bias column is not shrunk) and
    ``lam = ridge * mean(diag(G))`` makes ``ridge`` scale-free. Cholesky in the
    input dtype (use float64), falling back to a least-squares solve when the
    matrix is not positive definite.
    """
    features = gram.shape[-1]
    diag = torch.diagonal(gram, dim1=-2, dim2=-1)
    lam = ridge * diag.mean(-1).clamp_min(1e-12)
    shrink = torch.ones(features, dtype=gram.dtype, device=gram.device)
    shrink[-1] = 0.0
    reg = lam[..., None, None] * torch.diag_embed(shrink.expand_as(diag))
    lhs = gram + reg
    rhs = cross + reg @ prior
    chol, info = torch.linalg.cholesky_ex(lhs)
    if bool((info == 0).all()):
        return torch.cholesky_solve(rhs, chol)
    return torch.linalg.lstsq(lhs, rhs).solution


def squared_residual(gram: torch.Tensor, cross: torch.Tensor, target_sq: torch.Tensor,
                     w: torch.Tensor) -> torch.Tensor:
    """``sum ||X w - Y||^2`` from the normal equations: ``tr(w^T G w) - 2 tr(w^T B) + sum Y^2``."""
    quad = (w * (gram @ w)).sum((-2, -1))
    lin = (w * cross).sum((-2, -1))
    return (quad - 2 * lin + target_sq).clamp_min(0.0)


def linear_to_gap_weight(weight: torch.Tensor, in_channels: int, spatial: Sequence[int]) -> torch.Tensor:
    """Pointwise weight ``(K, C, 1, ...)`` of a global-average head standing in
    for a Linear on a flattened ``(C, *spatial)`` map: the Linear's weight
    summed over the positions.

    On a map that is constant over its positions the pointwise convolution
    followed by global average pooling computes exactly what the Linear did;
    for a ``1x1`` map it is the Linear itself.
    """
    kernel = linear_to_conv_weight(weight, in_channels, spatial)
    dims = tuple(range(2, kernel.dim()))
    return kernel.sum(dim=dims, keepdim=True) if dims else kernel


def compose_affine(steps: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The one affine map ``x -> W x + b`` that applying ``steps`` in order computes.

    A step is ``(weight, bias)``: a ``(out, in)`` matrix (a Linear), or a
    vector that scales each feature (an eval BatchNorm1d, a constant factor);
    ``bias`` may be None. Computed in float64 from the last step back (for a
    classifier the product narrows to the K classes first), returned in the
    first weight's dtype.

    >>> w, b = compose_affine([(fc1.weight, fc1.bias), (fc2.weight, fc2.bias)])   # fc2(fc1(x)) == w @ x + b
    """
    if not steps:
        raise ValueError("compose_affine needs at least one step")
    first = steps[0][0]
    weight: torch.Tensor | None = None  # the product of the steps seen so far, from the last one back
    bias: torch.Tensor | None = None
    for step_weight, step_bias in reversed(steps):
        w = step_weight.detach().to(torch.float64)
        b = None if step_bias is None else step_bias.detach().to(w)
        if weight is None:
            weight = torch.diag(w) if w.dim() == 1 else w
            bias = b if b is not None else torch.zeros(weight.shape[0], dtype=w.dtype, device=w.device)
            continue
        if b is not None:
            bias = bias + weight @ b
        weight = weight * w if w.dim() == 1 else weight @ w
    return weight.to(first.dtype), bias.to(first.dtype)


def flattened_head_to_gap(steps: Sequence[tuple[torch.Tensor, torch.Tensor | None]], in_channels: int,
                          spatial: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight ``(K, C, 1, ...)`` and bias ``(K,)`` of the paper's global-average
    head (one pointwise convolution to the K classes, then global average
    pooling) standing in for a head of Linear layers on a flattened
    ``(C, *spatial)`` map: the product of the head's affine ``steps`` (see
    :func:`compose_affine`; the first is the Linear on the flattened map), its
    first factor summed over the positions (:func:`linear_to_gap_weight`).

    Exact on maps that are constant over their positions when nothing but
    the given affine steps lies between the Linear layers (activations taken
    as identities): an initialization, the data-free one.
    """
    (first_weight, first_bias), rest = steps[0], list(steps[1:])
    summed = linear_to_gap_weight(first_weight.detach(), in_channels, spatial)
    dims = summed.dim() - 2
    weight, bias = compose_affine([(summed.reshape(summed.shape[0], in_channels), first_bias), *rest])
    return weight.reshape(*weight.shape, *([1] * dims)), bias
