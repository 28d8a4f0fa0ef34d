"""Borders for an exact max pooling: padding whose every tap copies a valid
tap of its own window.

A max pooling pads with -inf, which no convolution can carry (``inf - inf``).
Padding with copies of taps of the same window changes no window's max, on
any input. Along an axis with dilation 1, edge replication does it: a window
that holds a padded tap and a valid one holds the border tap, the one the
padding copies. Along an axis with dilation ``d``, a window's taps share one
residue mod ``d``, so the padding repeats the first (last) ``d`` elements:
the padded position ``-j`` copies the first valid position of its residue,
``(-j) mod d``, which lies between ``-j`` and the window's valid tap, so in
the window.

Only windows with no valid tap at all (PyTorch gives -inf there; only at
inputs shorter than the dilated window) differ.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from convify.core import weights as W


class TapPad(nn.Module):
    """Pads each spatial axis by copying valid taps of the same window: edge
    replication where ``dilation`` is 1, the first/last ``d`` elements
    repeated where it is ``d``. ``padding``: (left, right) per axis; or
    ``same=True``: timm's "same" padding, computed from the input's size at
    run time (the odd one on the right).

    >>> TapPad((3,), (1,), (2,), padding=[(2, 2)])(torch.arange(5.)[None, None])
    tensor([[[0., 1., 0., 1., 2., 3., 4., 3., 4.]]])
    """

    convify_leaf = True  # its forward works out sizes; a rewritten model retraces to the same graph

    def __init__(self, kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int], *,
                 padding: Sequence[tuple[int, int]] | None = None, same: bool = False) -> None:
        super().__init__()
        if (padding is None) == (not same):
            raise ValueError("TapPad takes padding or same=True")
        self.kernel, self.stride, self.dilation = tuple(kernel), tuple(stride), tuple(dilation)
        self.padding = None if padding is None else tuple((int(a), int(b)) for a, b in padding)
        self.same = same

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = self._pads(x.shape[2:])
        edge = [v for i in reversed(range(len(pads))) for v in (pads[i] if self.dilation[i] == 1 else (0, 0))]
        if any(self.dilation[i] == 1 for i in range(len(pads))):
            x = F.pad(x, edge, mode="replicate")
        for i, (left, right) in enumerate(pads):
            if self.dilation[i] > 1:
                x = _extend_by_residue(x, 2 + i, left, right, self.dilation[i], self._repeats(i))
        return x

    def _pads(self, spatial: Sequence) -> list[tuple]:
        if self.padding is not None:
            return list(self.padding)
        return [W.same_padding(n, k, s, d) for n, k, s, d in zip(spatial, self.kernel, self.stride, self.dilation)]

    def _repeats(self, i: int) -> int:
        """Copies of ``d`` elements that cover one side's padding: the fixed
        padding's, or for "same" the most it can be (``(k - 1) d``), so that an
        exported graph has no loop that depends on the size."""
        d = self.dilation[i]
        most = max(self.padding[i]) if self.padding is not None else (self.kernel[i] - 1) * d
        return max(1, math.ceil(most / d))

    def extra_repr(self) -> str:
        text = f"kernel={self.kernel}, stride={self.stride}, dilation={self.dilation}"
        return text + (", same=True" if self.same else f", padding={self.padding}")


def _extend_by_residue(x: torch.Tensor, dim: int, left, right, d: int, repeats: int) -> torch.Tensor:
    """``x`` with ``left`` and ``right`` elements added along ``dim``, each a
    copy of the nearest element with the same position mod ``d``.

    Every slice has a length known without the input's size (``d``,
    ``left``, ``right``) and a start that is never negative, taken with
    ``narrow``: a negative start (``x[-d:]``) or a slice that may run past
    the end makes the dynamo exporter clamp its bounds with ``Max``/``Min``
    on the shape, which an exported exact model must not hold. The first
    and last ``d`` elements come from ``x`` edge-padded by ``d - 1`` (a
    constant): an axis shorter than ``d`` is made ``d`` long by replication,
    and those copies only reach windows with no valid tap.
    """
    n = x.shape[dim]
    edged = F.pad(x, _one_side(x.dim(), dim, d - 1, d - 1), mode="replicate")
    head = edged.narrow(dim, d - 1, d)   # x[0:d]
    tail = edged.narrow(dim, n - 1, d)   # x[n-d:n]
    before = torch.cat([head] * repeats, dim).narrow(dim, repeats * d - left, left)
    after = torch.cat([tail] * repeats, dim).narrow(dim, 0, right)
    return torch.cat([before, x, after], dim)


def _one_side(rank: int, dim: int, left: int, right: int) -> list[int]:
    """``F.pad``'s argument that pads ``dim`` only (it lists the last dimension first)."""
    pad = [0] * (2 * (rank - 2))
    at = 2 * (rank - 1 - dim)
    pad[at], pad[at + 1] = left, right
    return pad
