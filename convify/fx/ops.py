"""What convify knows about PyTorch's ops, in one place.

Which modules, functions and methods act on each element alone (and which of
those are affine in eval mode), which act per channel, which compute max or
average pooling (and which max poolings pad "same" at run time), which give
non-negative outputs and which keep their input's sign. Tracing, shape propagation and every rewrite read these
tables; none keeps its own copy.
"""
from __future__ import annotations

import enum
import operator
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from convify.core.rewrites import maxpool as maxpool_spec

# --------------------------------------------------------------------------- elementwise ops

#: Activations: each output element depends on its own input element only.
ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.PReLU,
)
#: Identities in eval mode (so affine): Identity and every Dropout.
PASS_THROUGH_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
ELEMENTWISE_MODULES = ACTIVATION_MODULES + PASS_THROUGH_MODULES

ACTIVATION_FUNCTIONS: frozenset[Callable] = frozenset({
    F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu,
    F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
})
PASS_THROUGH_FUNCTIONS: frozenset[Callable] = frozenset({F.dropout, F.alpha_dropout, torch.dropout})
#: ``x * 2``, ``x + 1``...: elementwise and affine when the other operand is a number.
SCALAR_OPERATORS: frozenset[Callable] = frozenset({
    operator.mul, operator.truediv, operator.add, operator.sub, torch.mul, torch.add,
})
ACTIVATION_METHODS = frozenset({"relu", "relu_", "sigmoid", "tanh"})
PASS_THROUGH_METHODS = frozenset({"contiguous", "clone"})

#: Per-channel affine maps of a feature map (in eval mode).
#: Every BatchNorm with running statistics (1d/2d/3d, SyncBatchNorm, the lazy ones): what reconstruction
#: re-estimates and synthetic calibration matches.
BATCH_NORM = nn.modules.batchnorm._BatchNorm
PER_CHANNEL_MODULES: tuple[type[nn.Module], ...] = (BATCH_NORM,)
PER_CHANNEL_FUNCTIONS: frozenset[Callable] = frozenset({F.batch_norm})

#: Modules whose output has their input's shape and dtype (by exact type: a
#: subclass may do anything), so shape propagation can hand the input on.
SHAPE_PRESERVING_MODULES: frozenset[type[nn.Module]] = frozenset(
    ELEMENTWISE_MODULES + (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))


class Elementwise(enum.Enum):
    """How an op that acts on each element alone relates to its input."""

    AFFINE = "affine"            # an identity or a scaling in eval mode: commutes with averaging
    NONLINEAR = "nonlinear"      # an activation


def elementwise_kind(gm: fx.GraphModule, node: fx.Node) -> Elementwise | None:
    """How ``node`` acts on the elements of its one tensor input, or None when
    it is no elementwise op (or reads more than one tensor)."""
    if len(node.all_input_nodes) != 1 or not node.args or node.args[0] is not node.all_input_nodes[0]:
        return None
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, PASS_THROUGH_MODULES):
            return Elementwise.AFFINE
        return Elementwise.NONLINEAR if isinstance(module, ACTIVATION_MODULES) else None
    if node.op == "call_function":
        if node.target in PASS_THROUGH_FUNCTIONS:
            return Elementwise.AFFINE
        if node.target in ACTIVATION_FUNCTIONS:
            return Elementwise.NONLINEAR
        if node.target in SCALAR_OPERATORS and len(node.args) == 2 and isinstance(node.args[1], (int, float)):
            return Elementwise.AFFINE
        return None
    if node.op == "call_method":
        if node.target in PASS_THROUGH_METHODS:
            return Elementwise.AFFINE
        return Elementwise.NONLINEAR if node.target in ACTIVATION_METHODS else None
    return None


def is_per_channel(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A per-channel affine map of a feature map (BatchNorm), reading one tensor."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), PER_CHANNEL_MODULES)
    return node.op == "call_function" and node.target in PER_CHANNEL_FUNCTIONS


# --------------------------------------------------------------------------- pooling


@dataclass(frozen=True)
class MaxPoolFunction:
    """A functional max pooling: its name, dimensionality and whether it
    always returns indices."""

    name: str
    dims: int
    returns_indices: bool = False


#: Functional max pooling, matched by identity (``F.max_pool2d`` is a
#: boolean-dispatch wrapper whose ``__name__`` lacks "max_pool").
MAX_POOL_FUNCTIONS: dict[Callable, MaxPoolFunction] = {
    F.max_pool1d: MaxPoolFunction("max_pool1d", 1),
    F.max_pool2d: MaxPoolFunction("max_pool2d", 2),
    F.max_pool3d: MaxPoolFunction("max_pool3d", 3),
    torch.max_pool1d: MaxPoolFunction("max_pool1d", 1),
    torch.max_pool2d: MaxPoolFunction("max_pool2d", 2),
    torch.max_pool3d: MaxPoolFunction("max_pool3d", 3),
    F.max_pool1d_with_indices: MaxPoolFunction("max_pool1d_with_indices", 1, True),
    F.max_pool2d_with_indices: MaxPoolFunction("max_pool2d_with_indices", 2, True),
    F.max_pool3d_with_indices: MaxPoolFunction("max_pool3d_with_indices", 3, True),
    torch.max_pool1d_with_indices: MaxPoolFunction("max_pool1d_with_indices", 1, True),
}
#: Adaptive max pooling: its windows depend on the input size.
ADAPTIVE_MAX_POOL_FUNCTIONS: dict[Callable, str] = {
    F.adaptive_max_pool1d: "adaptive_max_pool1d", F.adaptive_max_pool2d: "adaptive_max_pool2d",
    F.adaptive_max_pool3d: "adaptive_max_pool3d",
    F.adaptive_max_pool1d_with_indices: "adaptive_max_pool1d_with_indices",
    F.adaptive_max_pool2d_with_indices: "adaptive_max_pool2d_with_indices",
    F.adaptive_max_pool3d_with_indices: "adaptive_max_pool3d_with_indices",
}
#: Every call that computes a max pooling, fixed-window or adaptive.
MAX_POOLING_CALLS: frozenset[Callable] = frozenset(MAX_POOL_FUNCTIONS) | frozenset(ADAPTIVE_MAX_POOL_FUNCTIONS)
#: The fixed-window max poolings that return values only (what ``nn.MaxPoolNd`` runs).
VALUE_MAX_POOL_FUNCTIONS: dict[Callable, int] = {
    f: spec.dims for f, spec in MAX_POOL_FUNCTIONS.items() if not spec.returns_indices}

MAX_POOL_MODULES: dict[type[nn.Module], int] = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}
MAX_POOLING_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)


def same_max_pool_classes() -> dict[type[nn.Module], int]:
    """Max pooling modules that pad "same" at run time, with -inf, before
    pooling, by class (with their dimensionality): timm's ``MaxPool2dSame``,
    whose forward is ``pad_same(x, k, s, d, value=-inf)`` then ``F.max_pool2d``
    with no padding. Looked up only when timm is already imported (by whoever
    built the model): convify never imports timm itself."""
    if "timm" not in sys.modules:
        return {}
    try:
        from timm.layers.pool2d_same import MaxPool2dSame  # noqa: PLC0415
    except Exception:  # a timm without it
        return {}
    return {MaxPool2dSame: 2}


def same_max_pool_dims(module: nn.Module) -> int | None:
    """The dimensionality of ``module`` when it is one of
    :func:`same_max_pool_classes` running that class's own forward (a subclass
    that overrides it may do anything); else None."""
    for cls, dims in same_max_pool_classes().items():
        if isinstance(module, cls) and type(module).forward is cls.forward:
            return dims
    return None


ADAPTIVE_AVG_POOL_FUNCTIONS: dict[int, Callable] = {
    1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
ADAPTIVE_MAX_POOL_BY_DIMS: dict[int, Callable] = {
    1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}
AVG_POOL_FUNCTIONS: dict[int, Callable] = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
MAX_POOL_BY_DIMS = maxpool_spec.MAX_POOL_BY_DIMS  # declared once, with the pooling's parameters

CONV_MODULES: dict[int, type[nn.modules.conv._ConvNd]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


# --------------------------------------------------------------------------- sign


#: Ops whose output is >= 0 whatever their input. Hardtanh (and so ReLU6,
#: its subclass) and Softplus only with some arguments: :mod:`convify.fx.nonnegative`
#: reads them (``NONNEGATIVE_IF``).
NONNEGATIVE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Sigmoid, nn.Hardsigmoid, nn.Softplus)
NONNEGATIVE_FUNCTIONS: frozenset[Callable] = frozenset({
    F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.hardtanh, F.hardtanh_, torch.sigmoid, F.sigmoid,
    F.hardsigmoid, F.softplus})
NONNEGATIVE_METHODS = frozenset({"relu", "relu_", "sigmoid", "sigmoid_"})
#: The argument conditions of the conditional ones: name, position in a
#: functional call, default, and the test its value must pass.
NONNEGATIVE_IF: dict[type[nn.Module] | Callable, tuple[tuple[str, int, float, Callable[[float], bool]], ...]] = {
    nn.Hardtanh: (("min_val", 1, -1.0, lambda v: v >= 0),),
    F.hardtanh: (("min_val", 1, -1.0, lambda v: v >= 0),),
    F.hardtanh_: (("min_val", 1, -1.0, lambda v: v >= 0),),
    # softplus(x) = log(1 + exp(beta x)) / beta, and x itself where beta x > threshold
    nn.Softplus: (("beta", 1, 1.0, lambda v: v > 0), ("threshold", 2, 20.0, lambda v: v >= 0)),
    F.softplus: (("beta", 1, 1.0, lambda v: v > 0), ("threshold", 2, 20.0, lambda v: v >= 0)),
}

#: Ops whose output is >= 0 where their (first) input is: identities in eval
#: mode, dropout (a mask times a positive scale), pooling (a max or an
#: average of the input's values), shape and copy methods.
SIGN_KEEPING_MODULES: tuple[type[nn.Module], ...] = PASS_THROUGH_MODULES + MAX_POOLING_MODULES + (
    nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd, nn.Flatten, nn.Unflatten)
SIGN_KEEPING_FUNCTIONS: frozenset[Callable] = PASS_THROUGH_FUNCTIONS | MAX_POOLING_CALLS | frozenset({
    *AVG_POOL_FUNCTIONS.values(), *ADAPTIVE_AVG_POOL_FUNCTIONS.values(), torch.flatten, torch.reshape})
SIGN_KEEPING_METHODS = PASS_THROUGH_METHODS | frozenset({"view", "reshape", "flatten", "contiguous", "clone"})
#: Concatenations: >= 0 where every tensor concatenated is.
CONCAT_FUNCTIONS: frozenset[Callable] = frozenset({torch.cat, torch.concat, torch.concatenate})
