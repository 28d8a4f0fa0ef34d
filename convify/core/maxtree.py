"""Max pooling as convolutions and ReLUs, exactly: the weights of the tree.

``max(a, b) = b + relu(a - b)``. Pairing the values of a window and repeating
the identity computes their max in ``ceil(log2(n))`` ReLU levels: each level
is a linear map of the previous level's ReLU outputs (a grouped convolution,
one group per channel), the last one linear. A value carried to the next
level (the ``b`` of each pair, the odd one out) takes two channels,
``relu(b) - relu(-b)``, unless the input is non-negative, where ``relu(b) = b``.

Three shapes of tree, all exact (see :class:`TreeForm`):

* **direct**: the first convolution has the whole window and pairs its
  ``prod(kernel)`` taps; then 1x1 convolutions;
* **separable**: one axis at a time (a window's max is the max over rows of
  the maxes over columns): a 1-D tree along the last axis at the pooling's
  stride there, then along the axis before it, ...; each 1-D tree's last
  (linear) layer is merged into the next tree's first convolution;
* **chain**: one axis at a time, each a chain of depthwise convolutions
  (one channel in, one out) whose carried values are additions, not channels
  (:func:`depthwise_chain`): ``max(a, b) = b + relu(a - b)`` with ``b`` added
  back from the input, so a value needs one channel whatever its sign.

Everything here is one channel's weights, in float64; :func:`grouped_weight`
repeats them for ``C`` channels (``groups=C``). Nothing here knows a graph.

>>> layers = max_tree((3, 3), (2, 2), (1, 1), signed=True, form=TreeForm.SEPARABLE)
>>> [tuple(layer.weight.shape) for layer in layers]
[(5, 1, 1, 3), (3, 5, 1, 1), (5, 3, 3, 1), (3, 5, 1, 1), (1, 3, 1, 1)]
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Sequence

import torch

Ints = tuple[int, ...]


class TreeForm(enum.Enum):
    """The shape of the max tree (``replace_maxpool(..., exact_form=...)``;
    ``benchmarks/ort_latency.py`` and ``benchmarks/exact_pool.py`` measure them)."""

    CHAIN = "chain"            # one axis at a time, chains of depthwise convolutions and additions (fastest)
    SEPARABLE = "separable"    # one axis at a time, last axis first; convolutions and ReLUs only
    DIRECT = "direct"          # one convolution over the whole window, then 1x1s; convolutions and ReLUs only

    @property
    def help(self) -> str:
        return _FORM_HELP[self]

    @property
    def adds(self) -> bool:
        """Whether the tree adds tensors (carried values are skips), beyond convolutions and ReLUs."""
        return self is TreeForm.CHAIN


_FORM_HELP = {
    TreeForm.CHAIN: "per axis of the window, a chain of depthwise convolutions, ReLUs and additions (the fastest)",
    TreeForm.SEPARABLE: "per axis of the window, a pairwise tree of convolutions and ReLUs only (values carried "
                        "as channels; the form neural-network verifiers take)",
    TreeForm.DIRECT: "one convolution over the whole window, then 1x1 convolutions, ReLUs only between them",
}


@dataclass(frozen=True)
class TreeLayer:
    """One convolution of the tree for one channel: ``weight`` is
    ``(out, in, *kernel)`` in float64, no bias; ``relu``: a ReLU follows."""

    weight: torch.Tensor
    stride: Ints
    dilation: Ints
    padding: Ints
    relu: bool

    @property
    def channels(self) -> int:
        return self.weight.shape[0]


def pairwise_max_levels(n: int, signed: bool) -> list[torch.Tensor]:
    """Matrices ``A_0, ..., A_L`` with ``max(v) = A_L relu(A_{L-1} ... relu(A_0 v))``
    for every vector ``v`` of ``n`` values (every ``v >= 0`` when not ``signed``).

    ``L = ceil(log2(n))`` ReLU levels; ``A_L`` is one row. Values are paired in
    order, ``(v0, v1), (v2, v3), ...``; the odd one is carried.

    >>> [tuple(a.shape) for a in pairwise_max_levels(3, signed=True)]
    [(5, 3), (3, 5), (1, 3)]
    """
    if n < 1:
        raise ValueError(f"a max needs at least one value, not {n}")
    carry = (1.0, -1.0) if signed else (1.0,)  # b = relu(b) - relu(-b), or relu(b) when b >= 0
    values = torch.eye(n, dtype=torch.float64)  # each value, as a row over the current inputs
    levels: list[torch.Tensor] = []
    while values.shape[0] > 1:
        rows: list[torch.Tensor] = []
        sums: list[tuple[int, tuple[float, ...]]] = []  # each next value: where its channels start, their signs
        for i in range(0, values.shape[0] - 1, 2):
            a, b = values[i], values[i + 1]
            sums.append((len(rows), (1.0, *carry)))  # max(a, b) = relu(a - b) + b
            rows += [a - b, *(c * b for c in carry)]
        if values.shape[0] % 2:
            sums.append((len(rows), carry))
            rows += [c * values[-1] for c in carry]
        levels.append(torch.stack(rows))
        values = torch.zeros(len(sums), len(rows), dtype=torch.float64)
        for j, (start, signs) in enumerate(sums):
            values[j, start:start + len(signs)] = torch.tensor(signs, dtype=torch.float64)
    levels.append(values)
    return levels


def relu_levels(n: int) -> int:
    """ReLU levels of the tree over ``n`` values: ``ceil(log2(n))``."""
    return math.ceil(math.log2(n)) if n > 1 else 0


def max_tree(kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int], *, signed: bool,
             form: TreeForm, padding: Sequence[int] | None = None,
             extra: Sequence[int] | None = None) -> list[TreeLayer]:
    """One channel's layers of a tree that computes the max pooling with this
    window over an input padded so that every window holds valid taps only
    (replicated borders), or, with ``padding`` (zeros, inside the
    convolutions), over a non-negative input (``signed=False``).

    ``extra``: zeros a ``ceil_mode`` pooling needs after the input, per axis
    (:attr:`convify.core.rewrites.maxpool.PoolParams.extra_pad`), also
    inside the convolutions (:func:`zeros_inside`). Output length per axis:
    ``(n + 2 p + e - d (k - 1) - 1) // s + 1``, the pooling's.
    """
    dims = len(kernel)
    padding, lead = zeros_inside(padding, extra, dilation)
    if padding != (0,) * dims and signed:
        raise ValueError("zero padding is exact on a non-negative input only (signed=False)")
    if form is TreeForm.CHAIN:
        raise ValueError("the chain form is depthwise convolutions with additions: depthwise_chain builds it")
    if form is TreeForm.DIRECT or dims == 1:
        return _direct(tuple(kernel), tuple(stride), tuple(dilation), padding, lead, signed)
    return _separable(tuple(kernel), tuple(stride), tuple(dilation), padding, lead, signed)


def zeros_inside(padding: Sequence[int] | None, extra: Sequence[int] | None,
                 dilation: Sequence[int]) -> tuple[Ints, Ints]:
    """The zeros a convolution pads each side with, and the zero taps it
    leads its kernel with, so that it reads ``padding`` zeros on each side and
    ``extra`` more after the input only.

    PyTorch's convolutions pad both sides alike: padding ``p + e`` on each
    side and ``e / d`` zero taps before the kernel's first put the windows
    where they were (each starts ``e`` earlier, on taps that weigh nothing)
    and add the windows that end in the ``e`` right zeros. Needs ``e`` a
    multiple of the dilation ``d`` (always so at ``d = 1``):
    :func:`extra_fits_inside` says whether it is.

    >>> zeros_inside((1, 0), (1, 1), (1, 1))
    ((2, 1), (1, 1))
    """
    dims = len(dilation)
    padding = tuple(padding) if padding is not None else (0,) * dims
    extra = tuple(extra) if extra is not None else (0,) * dims
    if not extra_fits_inside(extra, dilation):
        raise ValueError(f"{extra} extra zeros are not whole taps at dilation {tuple(dilation)}: pad them before")
    return tuple(p + e for p, e in zip(padding, extra)), tuple(e // d for e, d in zip(extra, dilation))


def extra_fits_inside(extra: Sequence[int], dilation: Sequence[int]) -> bool:
    """Whether a ``ceil_mode`` pooling's extra right zeros can be padded
    inside the convolutions (:func:`zeros_inside`)."""
    return all(e % d == 0 for e, d in zip(extra, dilation))


def _lead(weight: torch.Tensor, taps: dict[int, int]) -> torch.Tensor:
    """``weight`` with ``taps[axis]`` zero taps before its first along each spatial axis."""
    dims = weight.dim() - 2
    pad = [v for a in reversed(range(dims)) for v in (taps.get(a, 0), 0)]
    return torch.nn.functional.pad(weight, pad) if any(pad) else weight


def _direct(kernel: Ints, stride: Ints, dilation: Ints, padding: Ints, lead: Ints,
            signed: bool) -> list[TreeLayer]:
    levels = pairwise_max_levels(math.prod(kernel), signed)
    ones = (1,) * len(kernel)
    first = levels[0].reshape(levels[0].shape[0], 1, *kernel)  # taps in the kernel's row-major order
    first = _lead(first, dict(enumerate(lead)))
    layers = [TreeLayer(first, stride, dilation, padding, relu=len(levels) > 1)]
    layers += [_pointwise(a, ones, relu=i < len(levels) - 1) for i, a in enumerate(levels[1:], start=1)]
    return layers


def _separable(kernel: Ints, stride: Ints, dilation: Ints, padding: Ints, lead: Ints,
               signed: bool) -> list[TreeLayer]:
    """1-D trees along each axis with a window, last axis first; an axis
    with a one-tap window only strides, in the first convolution."""
    dims = len(kernel)
    ones = (1,) * dims
    axes = [a for a in reversed(range(dims)) if kernel[a] > 1] or [dims - 1]
    layers: list[TreeLayer] = []
    pending = torch.ones(1, 1, dtype=torch.float64)  # the last linear row, merged into the next first layer
    for n, axis in enumerate(axes):
        levels = pairwise_max_levels(kernel[axis], signed)
        along = lambda value, rest=1: tuple(value if a == axis else rest for a in range(dims))
        first_stride = tuple(s if a == axis or (n == 0 and kernel[a] == 1) else 1 for a, s in enumerate(stride))
        first = levels[0][:, None, :] * pending[0][None, :, None]  # (out, in, taps): a linear map of a linear map
        first = _lead(first.reshape(*first.shape[:2], *along(kernel[axis])), {axis: lead[axis]})
        layers.append(TreeLayer(first, first_stride, along(dilation[axis]), along(padding[axis], 0),
                                relu=len(levels) > 1))
        if len(levels) == 1:  # a one-tap window on every axis: that layer was the whole tree
            return layers
        layers += [_pointwise(a, ones, relu=True) for a in levels[1:-1]]
        pending = levels[-1]
    layers.append(_pointwise(pending, ones, relu=False))
    return layers


def _pointwise(matrix: torch.Tensor, ones: Ints, *, relu: bool) -> TreeLayer:
    return TreeLayer(matrix.reshape(*matrix.shape, *ones), ones, ones, (0,) * len(ones), relu)


@dataclass(frozen=True)
class ChainStep:
    """One depthwise convolution of a chain: ``weight`` is ``(1, 1, *kernel)``
    (one channel's), float64, no bias. Its output is added to the previous
    step's of the same axis (if any), then ``relu`` says whether a ReLU follows."""

    weight: torch.Tensor
    stride: Ints
    dilation: Ints
    padding: Ints
    relu: bool


def depthwise_chain(kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int], *,
                    padding: Sequence[int] | None = None,
                    extra: Sequence[int] | None = None) -> list[tuple[int, list[ChainStep]]]:
    """The max pooling as chains of depthwise convolutions, ``(axis, steps)``
    for each spatial axis with a window (last axis first; an axis with a
    one-tap window only strides, in the first chain), each chain reading the
    previous one's output.

    Along an axis with taps ``z_0 .. z_{k-1}`` of each window, step ``i < k - 1``
    convolves with ``e_i - e_{i+1}`` and keeps ``t_i = relu(z_i - z_{i+1} +
    t_{i-1}) = max(z_0..z_{i+1}) - z_{i+1}`` (by induction, ``t_{-1} = 0``);
    the last step convolves with ``e_{k-1}`` and adds ``t_{k-2}``: the max.
    Exact on any input (no value is carried through a ReLU), over borders
    that copy valid taps, or with ``padding`` (zeros, inside the
    convolutions) on an input >= 0, ``extra`` as :func:`max_tree` takes it. ``k - 1`` ReLUs per axis: as many levels
    as the pairwise tree's ``ceil(log2(taps))`` for the 2- and 3-tap axes of
    the zoo's pools, more for longer windows (one convolution per tap either way).

    >>> [(axis, [tuple(s.weight.shape) for s in steps]) for axis, steps in depthwise_chain((3, 2), (2, 2), (1, 1))]
    [(1, [(1, 1, 1, 2), (1, 1, 1, 2)]), (0, [(1, 1, 3, 1), (1, 1, 3, 1), (1, 1, 3, 1)])]
    """
    dims = len(kernel)
    padding, lead = zeros_inside(padding, extra, dilation)
    axes = [a for a in reversed(range(dims)) if kernel[a] > 1] or [dims - 1]
    chains: list[tuple[int, list[ChainStep]]] = []
    for n, axis in enumerate(axes):
        k = kernel[axis]
        along = lambda value, rest=1: tuple(value if a == axis else rest for a in range(dims))
        step_stride = tuple(s if a == axis or (n == 0 and kernel[a] == 1) else 1 for a, s in enumerate(stride))
        chain = []
        for i in range(k):
            taps = torch.zeros(k, dtype=torch.float64)
            taps[i] = 1.0
            if i < k - 1:
                taps[i + 1] = -1.0
            chain.append(ChainStep(_lead(taps.reshape(1, 1, *along(k)), {axis: lead[axis]}), step_stride,
                                   along(dilation[axis]), along(padding[axis], 0), relu=i < k - 1))
        chains.append((axis, chain))
    return chains


def ungrouped_weight(weight: torch.Tensor, channels: int, dtype: torch.dtype | None = None,
                     device: torch.device | None = None) -> torch.Tensor:
    """One channel's ``(out, in, *kernel)`` weight as the block-diagonal
    weight of an ordinary convolution over ``channels`` channels:
    ``(channels * out, channels * in, *kernel)``, zero between channels, for
    ``groups=1`` (tools that take no grouped convolution). It computes what
    :func:`grouped_weight` does with ``groups=channels``, at ``channels``
    times the MACs.

    >>> tuple(ungrouped_weight(torch.ones(2, 1, 3), 4).shape)
    (8, 4, 3)
    """
    eye = torch.eye(channels, dtype=weight.dtype, device=weight.device)
    out, inp, *kernel = weight.shape
    blocks = torch.einsum("cd,ab...->cadb...", eye, weight)  # [c, a, d, b]: w[a, b] where c == d
    return blocks.reshape(channels * out, channels * inp, *kernel).to(dtype=dtype, device=device)


def channel_weight(weight: torch.Tensor, channels: int, *, grouped: bool, dtype: torch.dtype | None = None,
                   device: torch.device | None = None) -> torch.Tensor:
    """:func:`grouped_weight` (``groups=channels``) or :func:`ungrouped_weight` (``groups=1``)."""
    make = grouped_weight if grouped else ungrouped_weight
    return make(weight, channels, dtype=dtype, device=device)


def grouped_weight(weight: torch.Tensor, channels: int, dtype: torch.dtype | None = None,
                   device: torch.device | None = None) -> torch.Tensor:
    """One channel's ``(out, in, *kernel)`` weight repeated for ``channels``
    groups: ``(channels * out, in, *kernel)``, for ``groups=channels``."""
    return weight.to(dtype=dtype, device=device).repeat(channels, *([1] * (weight.dim() - 1)))
