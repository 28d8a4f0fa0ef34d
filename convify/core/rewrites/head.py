"""The Linear head rewrite, declared: its options, its modes and the record of a converted head."""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

from convify.core.options import RewriteOptions, option
from convify.core.report import Replaced, Report, qualified
from convify.core.spec import RewriteSpec


class HeadMode(enum.Enum):
    """What the head becomes (``HeadOptions.mode``)."""

    CONV = "conv"          # ConvNd(C, K, kernel=S_P), the rest 1x1: exact at the traced size
    GAP = "gap"            # the paper's head: one 1x1 convolution to the K classes, global average pooling
    GAP_MLP = "gap_mlp"    # a 1x1 convolution, global average pooling, the rest of the MLP as 1x1 convolutions

    @property
    def averages(self) -> bool:
        """Whether the head reads a global average of the map (``gap``, ``gap_mlp``)."""
        return self is not HeadMode.CONV


class PoolRemoval(enum.Enum):
    """What became of the pooling in front of a head."""

    NONE = "none"            # no pooling, or it stays in front of the head
    GLOBAL = "global"        # a global average pooling was removed: the head runs at every position
    IDENTITY = "identity"    # an adaptive average pooling that is an identity at the traced size was removed
    RESAMPLING = "resampling"  # gap: an adaptive average pooling that resamples was removed (the global average follows)


class Exactness(enum.Enum):
    """What a rebuilt head's output is, compared with the Linear head's."""

    EXACT = "exact"                        # the same output at the traced size
    SCORE_MAP_MEAN = "score map mean"      # dense: a score map whose mean over positions is the original output
    PER_POSITION = "per-position"          # dense: a classifier at each position; its mean is not the original
    APPROXIMATE = "approximate"            # gap, gap_mlp: an initialization (``calibration=`` fits it)

    @property
    def exact(self) -> bool:
        return self is Exactness.EXACT


@dataclass(frozen=True)
class HeadRecord:
    """The typed record of one converted head (``Replaced.detail``).

    ``linears``: the head's Linear modules in graph order, by qualified name;
    each is now the convolution of the same name (``convify.matmul_heads``
    finds them here). ``kernel``: the first convolution's kernel; ``mode`` and
    ``dense``: how it was built; ``removal``: what became of the pooling in
    front of it; ``exactness``: what its output is next to the Linear head's
    (``Replaced.exact`` is ``exactness is Exactness.EXACT``). ``collapsed``:
    the paper's GAP head (``gap`` on a flattened map): ``linears`` is its one
    convolution, at the first Linear's name, and ``dropped`` the hidden
    Linears it replaced. ``parameters``: the head's parameter count before
    and after (its Linears and BatchNorm1d, then its convolutions).
    """

    linears: tuple[str, ...]
    kernel: tuple[int, ...]
    mode: HeadMode
    dense: bool
    removal: PoolRemoval
    exactness: Exactness
    collapsed: bool = False
    dropped: tuple[str, ...] = ()
    parameters: tuple[int, int] = (0, 0)

    def with_prefix(self, prefix: str) -> "HeadRecord":
        """The record with its module names qualified by ``prefix`` (the
        engine calls it for a head found in a submodule's graph)."""
        return dataclasses.replace(self, linears=tuple(qualified(prefix, n) for n in self.linears),
                                   dropped=tuple(qualified(prefix, n) for n in self.dropped))

    @property
    def logits_from(self) -> str:
        """The original model's Linear whose output this head's output stands
        for: the last Linear of a collapsed head, else the first (the one the
        global average moved across)."""
        return (self.linears + self.dropped)[-1] if self.collapsed else self.linears[0]

    @property
    def needs_fit(self) -> bool:
        """Whether calibration data would fit this head (a global-average
        head that is not exact), ``init="fit"``'s counterpart for heads."""
        return self.mode.averages and not self.exactness.exact


@dataclass(frozen=True)
class HeadOptions(RewriteOptions):
    """Options of :func:`convify.replace_linear_head`."""

    mode: str = option("conv", "Linear heads become exact convolutions (conv), the paper's 1x1 conv to the "
                       "classes + global average (gap), or a 1x1-conv MLP behind a global average (gap_mlp)",
                       choices=tuple(m.value for m in HeadMode))
    dense: bool = option(False, "fully convolutional: larger inputs give a map of scores")

    def wants_calibration(self) -> bool:
        return HeadMode(self.mode).averages


def _linears_removed(row: Replaced) -> int:
    if not isinstance(row.detail, HeadRecord):
        return 1
    return len(row.detail.linears) + len(row.detail.dropped)


def is_dense(report: Report) -> bool:
    """Whether a model with this report was made fully convolutional: a head
    pass ran with ``dense=True`` (a larger input gives a map of scores)."""
    return any(p.rewrite == SPEC.name and HeadOptions.from_dict(p.options).dense for p in report.passes)


SPEC = RewriteSpec(name="head", Options=HeadOptions, keyword="head", summary="Linear heads become convolutions",
                   order=20, onnx_ops=("Gemm", "MatMul"), onnx_ops_removed=_linears_removed)
