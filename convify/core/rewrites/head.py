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
class HeadFacts:
    """What a frontend saw of one head and its plan, in the core's terms:
    all :func:`judge_head` needs. ``reads_point``: the first layer reads one
    position (its map is 1x1); ``source_is_point``: so is the map in front of
    a removed global pooling; ``affine_front``: the per-position ops between
    that pooling and the first layer are affine; ``affine_tail``: so is
    everything from the first layer on (layers, BatchNorm, identities);
    ``class_op``: with ``dense``, the op applied to the classes at each
    position (a Softmax), or None."""

    mode: HeadMode
    dense: bool
    collapsed: bool
    removal: PoolRemoval
    reads_point: bool
    source_is_point: bool
    affine_front: bool
    affine_tail: bool
    class_op: str | None = None


def judge_head(facts: HeadFacts) -> tuple[Exactness, str | None]:
    """How a rebuilt head's output relates to the original's, and a note
    saying why when it is not exact; the same verdict in every frontend.

    >>> judge_head(HeadFacts(HeadMode.CONV, False, False, PoolRemoval.NONE, False, False, True, True))
    (<Exactness.EXACT: 'exact'>, None)
    """
    removed_global = facts.removal is PoolRemoval.GLOBAL
    point_map = not removed_global or facts.source_is_point
    if facts.mode is HeadMode.CONV and (not facts.dense or point_map):
        return Exactness.EXACT, None
    if facts.collapsed:
        return Exactness.APPROXIMATE, (
            "not exact: the paper's GAP head replaces the MLP (one 1x1 convolution to the classes, global "
            "average pooling; the hidden layers are gone); initialized with the product of the head's weight "
            "matrices summed over the positions (exact on spatially constant maps when the activations between "
            "the layers are identities)")
    if facts.mode.averages and not removed_global:
        if facts.reads_point:
            return Exactness.EXACT, None
        return Exactness.APPROXIMATE, (
            f"{facts.mode.value}: the first layer read a flattened map, so a global-average head cannot be exact; "
            "initialized with its weights summed over the positions (exact on spatially constant maps)")
    if facts.mode.averages and not facts.dense:
        if facts.affine_front:
            return Exactness.EXACT, None
        return Exactness.APPROXIMATE, ("gap: the ops between the pooling and the first layer are not affine (a "
                                       "LayerNorm, an activation): averaging after them differs")
    if point_map:
        return Exactness.EXACT, None
    if facts.class_op is not None:
        return Exactness.PER_POSITION, (
            f"dense: the output is a map of {facts.class_op} at each position; its mean over the positions is not "
            "the original output")
    if facts.affine_front and facts.affine_tail:
        return Exactness.SCORE_MAP_MEAN, (
            "dense: the output is a score map; the head after the pooling is affine, so its mean over the "
            "positions equals the original output at any input size")
    return Exactness.PER_POSITION, (
        "dense: the output is a per-position classifier (the head after the pooling is not affine: a "
        "non-linear MLP or a LayerNorm); its mean over the positions is not the original output")


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
