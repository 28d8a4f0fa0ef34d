"""The max pooling rewrite, declared: its options, its modes, and the records its sites leave.

A max pooling site is described by :class:`PoolParams` (its window, one value
per spatial dimension). What it becomes is a *pooling mode*: each mode is a
file of its own in a frontend (``convify/fx/rewrites/maxpool/``) that
registers a :class:`PoolMode` here, so that the option's choices, the
command line's ``--pool``, recipes and the census know it. A replaced site
leaves a :class:`PoolRecord`, which recovery (``init="fit"``, reconstruction)
reads to find the convolution it may set: ``PoolRecord.conv``.
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from convify.core import weights as W
from convify.core.maxtree import TreeForm
from convify.core.options import RewriteOptions, option
from convify.core.report import qualified
from convify.core.spec import RewriteSpec
from convify.errors import OptionError, UsageError

#: The fixed-window max pooling function of each number of spatial dimensions.
MAX_POOL_BY_DIMS: dict[int, Callable] = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


@dataclass(frozen=True)
class PoolParams:
    """The window of one max pooling, every field expanded to one value per dimension.

    ``same``: the pooling pads "same" at run time, with -inf, before pooling
    with no padding of its own (timm's ``MaxPool2dSame``): its padding depends
    on the input size (:func:`convify.core.weights.same_padding`) and its
    output length is ``ceil(size / stride)``; ``padding`` is then all zeros.

    ``padding_end``: the padding after the input (right/bottom) when it
    differs from ``padding`` (ONNX pads each side on its own; ``padding`` is
    then the padding before); None: both sides alike, as PyTorch pads.
    """

    dims: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    ceil_mode: bool
    return_indices: bool
    same: bool = False
    padding_end: tuple[int, ...] | None = None

    @classmethod
    def of(cls, dims: int, kernel: Any, stride: Any, padding: Any, dilation: Any, ceil_mode: Any,
           return_indices: Any, same: bool = False, padding_end: Any = None) -> "PoolParams":
        """From a pooling's arguments as PyTorch takes them (ints or
        sequences; ``stride`` None or empty: the kernel); ``padding_end``:
        the padding after the input where it differs from ``padding``."""
        kernel = W.ntuple(kernel, dims)
        no_stride = stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0)
        padding = W.ntuple(padding, dims)
        end = None if padding_end is None else W.ntuple(padding_end, dims)
        return cls(dims, kernel, kernel if no_stride else W.ntuple(stride, dims), padding,
                   W.ntuple(dilation, dims), bool(ceil_mode), bool(return_indices), same,
                   None if end == padding else end)

    @property
    def pads_end(self) -> tuple[int, ...]:
        """The padding after the input, per axis (``padding`` unless ``padding_end`` says otherwise)."""
        return self.padding if self.padding_end is None else self.padding_end

    @property
    def symmetric(self) -> bool:
        """Whether both sides of every axis are padded alike (as PyTorch's poolings and convolutions pad)."""
        return self.pads_end == self.padding

    def describe(self, op: str) -> str:
        parts = [f"k={fmt(self.kernel)}", f"s={fmt(self.stride)}"]
        if not self.symmetric:
            parts.append(f"p={fmt(self.padding)}/{fmt(self.pads_end)}")  # before/after the input
        elif any(self.padding):
            parts.append(f"p={fmt(self.padding)}")
        if any(d != 1 for d in self.dilation):
            parts.append(f"d={fmt(self.dilation)}")
        if self.ceil_mode:
            parts.append("ceil_mode")
        if self.same:
            parts.append("same")
        return f"{op}({', '.join(parts)})"

    @property
    def extra_pad(self) -> tuple[int, ...]:
        """Right/bottom zeros that reproduce ceil_mode's output size (none for
        a "same" pooling: its padded input leaves no partial window), after
        the padding after the input (``pads_end``)."""
        if not self.ceil_mode or self.same:
            return (0,) * self.dims
        return tuple(W.ceil_mode_extra_pad(k, s, p, d) for k, s, p, d in
                     zip(self.kernel, self.stride, self.pads_end, self.dilation))

    def same_pad(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """``F.pad``'s argument (last dimension first) for the "same" padding
        of an input of this spatial size."""
        pairs = [W.same_padding(n, k, s, d) for n, k, s, d in zip(spatial, self.kernel, self.stride, self.dilation)]
        return tuple(v for pair in reversed(pairs) for v in pair)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The max pooling these parameters describe, applied to ``x`` (its
        input in the original model), values only."""
        if self.same:
            x = F.pad(x, self.same_pad(x.shape[2:]), value=-float("inf"))
        if not self.symmetric:  # -inf before and after, ceil_mode's windows as extra -inf (see ``extra_pad``)
            pad = [v for b, e, x_ in reversed(list(zip(self.padding, self.pads_end, self.extra_pad)))
                   for v in (b, e + x_)]
            return MAX_POOL_BY_DIMS[self.dims](F.pad(x, pad, value=-float("inf")), self.kernel, self.stride, 0,
                                               self.dilation)
        return MAX_POOL_BY_DIMS[self.dims](x, self.kernel, self.stride, self.padding, self.dilation,
                                           self.ceil_mode)


def fmt(values: tuple[int, ...]) -> str:
    """``3`` for (3, 3), ``3x2`` for (3, 2)."""
    return str(values[0]) if len(set(values)) == 1 else "x".join(map(str, values))


# --------------------------------------------------------------------------- modes


@dataclass(frozen=True)
class PoolMode:
    """One thing a max pooling can become (``replace_maxpool(mode=...)``).

    ``learned``: its sites hold one new convolution standing for the pool
    (``PoolRecord.conv``), whose weights ``init`` sets and which
    ``init="fit"`` and ``convify.reconstruct`` may fit; False for a mode that
    adds no weights of its own (``fold``).
    """

    name: str
    help: str
    learned: bool = True


#: The pooling modes, by name, in the order they were registered; the
#: ``mode`` option's choices read it each time.
POOL_MODES: dict[str, PoolMode] = {}


def register_pool_mode(mode: PoolMode) -> PoolMode:
    """Make a pooling mode known (a frontend's mode file calls this)."""
    known = POOL_MODES.get(mode.name)
    if known is not None and known != mode:
        raise UsageError(f"two pooling modes are named {mode.name!r}: {known} and {mode}")
    POOL_MODES[mode.name] = mode
    return mode


def unregister_pool_mode(name: str) -> None:
    """Forget a pooling mode (tests declare toys)."""
    POOL_MODES.pop(name, None)


# The built-in modes, declared here so that options, flags and recipes know
# them without a frontend; each frontend implements them (convify/fx/rewrites/maxpool/).
CONV = register_pool_mode(PoolMode("conv", "a dense strided convolution ConvNd(C, C, k, s), the paper's "
                                           "learnable pooling"))
DEPTHWISE = register_pool_mode(PoolMode("depthwise", "the strided convolution grouped per channel (groups=C)"))
FOLD = register_pool_mode(PoolMode("fold", "dropped; its stride moves onto the stride-1 convolution before it "
                                           "(the Strided-CNN variant)", learned=False))
# learned=False: its weights are fixed by construction, spread over several layers; no single
# convolution stands for the pool, so ``init`` ("avg", "kaiming", "fit") does not apply to it
EXACT = register_pool_mode(PoolMode("exact", "convolutions and ReLUs (and, in the default chain form, additions) "
                                             "that compute the max pooling exactly (max(a, b) = b + relu(a - b)); "
                                             "see exact_form and grouped; init does not apply", learned=False))


# --------------------------------------------------------------------------- records


class PoolOutcome(enum.Enum):
    """What a site became in 0.2.0's records (``PoolRecord.outcome``). Kept
    so that models pickled by 0.2.0, whose reports hold it, still load;
    records now name their mode (``PoolRecord.mode``)."""

    CONV = "conv"
    DEPTHWISE = "depthwise"
    FOLD = "fold"


@dataclass(frozen=True)
class ExactTree:
    """How an exact site (``mode="exact"``) computes its max pooling.

    ``form``: the tree's shape; ``grouped``: its convolutions are grouped
    per channel (False: ordinary convolutions with block-diagonal weights); ``signed``: the input is not proven
    non-negative (``sign_proof`` says why it is): borders copy valid taps,
    and a form that carries values through ReLUs needs two channels per
    carried value (``relu(b) - relu(-b)``; the depthwise form adds them back
    instead, one channel whatever the sign); ``padding``: how borders are
    made exact; ``channels``: each convolution's output channels per input
    channel; ``parameters``: weights added; ``macs``: multiply-accumulates
    per image at the traced size (:func:`convify.zoo.count_macs`).
    """

    form: TreeForm
    signed: bool
    padding: str
    channels: tuple[int, ...]
    relu_levels: int
    parameters: int
    macs: int
    sign_proof: str | None = None
    grouped: bool = True

    def describe(self) -> str:
        if self.form.adds:  # carried values are added back: one channel each, whatever the sign
            sign = "signed input" if self.signed else f"input >= 0 ({self.sign_proof})"
        else:
            sign = ("signed input: two channels per carried value" if self.signed
                    else f"input >= 0 ({self.sign_proof}): one channel per carried value")
        convolutions = "grouped convolutions" if self.grouped else "ungrouped (block-diagonal) convolutions"
        return (f"exact: {len(self.channels)} {convolutions}, {self.relu_levels} ReLU levels, channels per "
                f"input channel {', '.join(map(str, self.channels))} ({self.form.value} tree); {sign}; "
                f"{self.padding}; +{self.parameters:,} parameters, +{self.macs:,} MACs per image")


@dataclass(frozen=True)
class PoolRecord:
    """The typed record of one replaced max pooling (``Replaced.detail``).

    ``mode``: the :class:`PoolMode` that built it. ``conv``: the qualified
    name of the one new convolution that stands for the pool, whose weights
    recovery may fit (None when the mode adds none: ``fold``); ``depthwise``:
    whether that convolution is grouped per channel. ``fold_blocker``: why
    a requested fold fell back to ``conv``. ``tree``: the layers of an
    exact site (``mode="exact"``), else None.
    """

    params: PoolParams
    mode: str
    conv: str | None = None
    depthwise: bool = False
    fold_blocker: str | None = None
    tree: ExactTree | None = None

    @property
    def exact(self) -> bool:
        """Whether the site computes the max pooling exactly (nothing to fit or reconstruct there)."""
        return self.tree is not None

    def with_prefix(self, prefix: str) -> "PoolRecord":
        """The record with its module name qualified by ``prefix`` (the
        engine calls it for a site found in a submodule's graph)."""
        return dataclasses.replace(self, conv=qualified(prefix, self.conv)) if self.conv else self


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class MaxPoolOptions(RewriteOptions):
    """Options of :func:`convify.replace_maxpool`."""

    mode: str = option("conv", lambda: "what each max pooling becomes: " + "; ".join(
        f"{m.name}: {m.help}" for m in POOL_MODES.values()), choices=POOL_MODES)
    init: str = option("avg", "weights of the new pooling convolutions: avg (average pooling), kaiming (fresh), "
                              "or fit (least squares against the max pooling on calibration images)",
                       choices=("avg", "kaiming", "fit"))

    exact_form: str = option(TreeForm.CHAIN.value, lambda: "with mode='exact', the shape of each site's layers: " +
                             "; ".join(f"{f.value}: {f.help}" for f in TreeForm), choices=[f.value for f in TreeForm])
    grouped: bool = option(True, "with mode='exact': convolutions grouped per channel (groups=C); False writes "
                                 "ordinary convolutions with block-diagonal weights (C times the MACs), for tools "
                                 "that take no grouped convolution", off_flag="ungrouped")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode != EXACT.name:
            changed = [f"{name}={getattr(self, name)!r}" for name in _EXACT_ONLY
                       if getattr(self, name) != MaxPoolOptions.defaults()[name]]
            if changed:
                raise OptionError(f"{self.rewrite}: {' and '.join(changed)} shape the layers of mode='exact' "
                                  f"only, not of mode={self.mode!r}; pass mode='exact' or leave them out")

    def to_dict(self) -> dict[str, Any]:
        """Its values by name; those of mode='exact' only where the mode is
        exact (elsewhere they are their defaults, which ``from_dict`` restores),
        so that reports and recipes of the other modes name what shapes them."""
        values = super().to_dict()
        if self.mode != EXACT.name:
            for name in _EXACT_ONLY:
                values.pop(name)
        return values

    @property
    def form(self) -> TreeForm:
        """The exact tree's shape (``exact_form``) as a :class:`TreeForm`."""
        return TreeForm(self.exact_form)

    def calibration_option(self) -> tuple[str, Any] | None:
        return ("init", "fit") if self.init == "fit" else None

    def for_rebuild(self) -> "MaxPoolOptions":
        # the same modules with the average init; the fitted weights are loaded into them
        return dataclasses.replace(self, init="avg") if self.init == "fit" else self


#: The options that shape mode='exact' only.
_EXACT_ONLY = ("exact_form", "grouped")

SPEC = RewriteSpec(name="maxpool", Options=MaxPoolOptions, keyword="pool",
                   summary="max pooling becomes strided convolution", order=10, onnx_ops=("MaxPool",),
                   onnx_ops_not_added=("Max", "ReduceMax", "TopK", "ArgMax"))
