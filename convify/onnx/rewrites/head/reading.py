"""Reading a fully connected layer off an ONNX graph: a ``Gemm``, or a
``MatMul`` with the ``Add`` of its bias, as one :class:`Linear` whose
``weight`` is the ``(K, F)`` matrix that multiplies the features (``alpha``
and ``transB`` worked in) and whose ``bias`` is ``(K,)`` (``beta`` worked in).

Also here: the op tables the head's walk reads (per-position ops that act
the same on an ``(N, F)`` vector and an ``(N, F, *S)`` map), and the weights
themselves (:func:`weight_value`): :func:`convify.onnx.values.constant_value`,
plus what the Caffe2 graphs of onnx's model zoo do: an initializer that is
also a graph input in an IR 3 model (IR 3 requires every initializer to be
one, so it is no default a caller is meant to replace), and a ``Reshape`` of
a constant by a constant shape.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_ir as ir

from convify.onnx.building import IR_VERSION_INITIALIZERS_APART
from convify.onnx.values import MAX_IDENTITIES, ShapeTable, attribute, constant_value, label

#: Element types a head's convolutions are built in (numpy holds them; ONNX's Conv takes them).
NUMPY_FLOATS = {ir.DataType.FLOAT: np.float32, ir.DataType.DOUBLE: np.float64, ir.DataType.FLOAT16: np.float16}

#: Per-position ops that leave the values as they are (at inference): ``(scale 1, shift 0)``.
IDENTITIES = frozenset({"Identity", "Dropout"})

#: Per-position non-linear activations, the same on a vector and on a map of any rank.
ACTIVATIONS = frozenset({"Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu",
                         "Softplus", "Softsign", "Gelu", "Mish", "ThresholdedRelu", "Clip"})

#: The ops a head's walk may cross between its layers, and between its pooling and its flatten.
PER_POSITION = IDENTITIES | ACTIVATIONS

#: Ops over the class axis of the head's ``(N, K)`` output (a final Softmax).
CLASS_AXIS = frozenset({"Softmax", "LogSoftmax"})


def is_standard(node: ir.Node | None, *op_types: str) -> bool:
    """Whether ``node`` is one of ``op_types`` of the ONNX domain."""
    return node is not None and node.domain in ("", "ai.onnx") and node.op_type in op_types


def per_position(node: ir.Node | None) -> bool:
    """Whether ``node`` is a per-position op of one data input whose other
    inputs (Clip's bounds, Dropout's ratio) are constants, and whose extra
    outputs (Dropout's mask) nobody reads: the same on a vector and on a map."""
    if node is None or not is_standard(node, *PER_POSITION) or not node.inputs or node.inputs[0] is None:
        return False
    if any(v is not None and constant_value(v) is None for v in node.inputs[1:]):
        return False
    if any(v is not None and (v.uses() or v.is_graph_output()) for v in node.outputs[1:]):
        return False
    if node.op_type == "Dropout" and len(node.inputs) > 2 and node.inputs[2] is not None:
        return not bool(constant_value(node.inputs[2]).reshape(-1)[0])  # training_mode=True drops at random
    return True


def is_batchnorm(node: ir.Node | None) -> bool:
    """An inference ``BatchNormalization`` (per channel, on axis 1 of any rank:
    the same on ``(N, F)`` and ``(N, F, *S)``) with constant statistics."""
    if node is None or not is_standard(node, "BatchNormalization") or len(node.inputs) != 5:
        return False
    if attribute(node, "training_mode", 0) or any(v is not None and (v.uses() or v.is_graph_output())
                                                   for v in node.outputs[1:]):
        return False
    return all(constant_value(v) is not None for v in node.inputs[1:])


def batchnorm_affine(node: ir.Node) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, shift)`` per feature of an inference BatchNormalization."""
    gamma, beta, mean, var = (constant_value(v).astype(np.float64) for v in node.inputs[1:])
    scale = gamma / np.sqrt(var + attribute(node, "epsilon", 1e-5))
    return scale, beta - mean * scale


def weight_value(value: ir.Value | None, ir_version: int) -> np.ndarray | None:
    """The constant ``value`` holds, as :func:`constant_value` reads it, also
    through an initializer-input of a model of ``ir_version`` 3 and a constant
    ``Reshape``; else None."""
    for _ in range(MAX_IDENTITIES):
        if value is None:
            return None
        if value.const_value is not None and value.is_graph_input() and ir_version < IR_VERSION_INITIALIZERS_APART:
            return value.const_value.numpy()
        node = value.producer()
        if is_standard(node, "Identity"):
            value = node.inputs[0]
            continue
        if is_standard(node, "Reshape") and len(node.inputs) > 1:
            data, shape = weight_value(node.inputs[0], ir_version), weight_value(node.inputs[1], ir_version)
            if data is None or shape is None:
                return None
            return _reshaped(data, shape.reshape(-1), bool(attribute(node, "allowzero", 0)))
        return constant_value(value)
    return None


def _reshaped(data: np.ndarray, shape: np.ndarray, allowzero: bool) -> np.ndarray | None:
    dims = [int(d) for d in shape]
    if not allowzero:
        dims = [data.shape[i] if d == 0 and i < data.ndim else d for i, d in enumerate(dims)]
    try:
        return data.reshape(dims)
    except ValueError:
        return None


# --------------------------------------------------------------------------- fully connected layers


@dataclass(frozen=True)
class Linear:
    """One fully connected layer: ``node`` (a Gemm or a MatMul), the ``Add``
    of a MatMul's bias, ``weight`` ``(K, F)`` (in the file's type, float64
    where alpha scaled it; a read-only view of the file's bytes where it can
    be) and ``bias`` ``(K,)`` in float64 or None; both cast to ``dtype`` when
    the convolution is built."""

    node: ir.Node
    bias_add: ir.Node | None
    weight: np.ndarray
    bias: np.ndarray | None
    dtype: ir.DataType

    @property
    def name(self) -> str:
        return label(self.node)

    @property
    def input(self) -> ir.Value:
        return self.node.inputs[0]

    @property
    def output(self) -> ir.Value:
        """The layer's result: the bias Add's, or the Gemm's or MatMul's."""
        return (self.bias_add or self.node).outputs[0]

    @property
    def nodes(self) -> tuple[ir.Node, ...]:
        return (self.node,) if self.bias_add is None else (self.node, self.bias_add)

    @property
    def classes(self) -> int:
        return self.weight.shape[0]

    @property
    def features(self) -> int:
        return self.weight.shape[1]

    @property
    def parameters(self) -> int:
        return self.weight.size + (0 if self.bias is None else self.bias.size)

    @property
    def numpy_dtype(self) -> type:
        return NUMPY_FLOATS[self.dtype]

    def describe(self) -> str:
        return f"{self.node.op_type}{'+Add' if self.bias_add is not None else ''}"


def is_linear_candidate(node: ir.Node, ir_version: int) -> bool:
    """A Gemm, or a MatMul with a constant right-hand side: a fully connected
    layer, if anything (a MatMul of two activations, as in attention, is none)."""
    if is_standard(node, "Gemm"):
        return True
    if not is_standard(node, "MatMul") or len(node.inputs) != 2:
        return False
    return weight_value(node.inputs[1], ir_version) is not None


def vector_reason(node: ir.Node, shapes: ShapeTable) -> str | None:
    """Why a layer's input is no ``(N, F)`` vector, hence no head, or None."""
    rank = shapes.of(node.inputs[0] if node.inputs else None).rank
    if rank is None or rank == 2:
        return None
    return (f"not a head: its input has rank {rank} (a {node.op_type} on tokens or vectors of vectors), not a "
            "flattened feature map (N, F)")


def read_linear(node: ir.Node, shapes: ShapeTable, ir_version: int) -> Linear | str:
    """``node`` (a Gemm, or a MatMul for which :func:`is_linear_candidate`) as a
    :class:`Linear`, or why it cannot be one (a str)."""
    if vector_reason(node, shapes):
        return vector_reason(node, shapes)
    dtype = shapes.of(node.inputs[0]).dtype
    if dtype not in NUMPY_FLOATS:
        return (f"its input is {dtype.name if dtype is not None else 'of unknown type'}; the head's convolutions "
                f"are built in {', '.join(t.name for t in NUMPY_FLOATS)}")
    read = _read_gemm if node.op_type == "Gemm" else _read_matmul
    found = read(node, lambda v: weight_value(v, ir_version))
    if isinstance(found, str):
        return found
    weight, bias, bias_add = found
    return Linear(node, bias_add, weight, bias, dtype)


def _read_gemm(node: ir.Node, weight: Callable[[ir.Value | None], np.ndarray | None]
               ) -> tuple[np.ndarray, np.ndarray | None, None] | str:
    if attribute(node, "transA", 0):
        return ("transA=1: the Gemm multiplies the transposed input, mixing the samples of a batch; no "
                "convolution computes that")
    b = weight(node.inputs[1]) if len(node.inputs) > 1 else None
    if b is None or b.ndim != 2:
        return _not_constant("weight B")
    alpha, beta = float(attribute(node, "alpha", 1.0)), float(attribute(node, "beta", 1.0))
    matrix = b if attribute(node, "transB", 0) else b.T
    if alpha != 1.0:
        matrix = alpha * matrix.astype(np.float64)
    bias = None
    c_value = node.inputs[2] if len(node.inputs) > 2 else None
    if c_value is not None and beta != 0.0:
        c = weight(c_value)
        if c is None:
            return _not_constant("bias C")
        bias = _per_class(c, matrix.shape[0])
        if bias is None:
            return (f"its bias C has shape {list(c.shape)}, which differs between samples; a convolution's bias is "
                    f"one value per class ({matrix.shape[0]})")
        bias = beta * bias
    return matrix, bias, None


def _read_matmul(node: ir.Node, weight: Callable[[ir.Value | None], np.ndarray | None]
                 ) -> tuple[np.ndarray, np.ndarray | None, ir.Node | None] | str:
    b = weight(node.inputs[1])
    if b is None or b.ndim != 2:
        return _not_constant("2-d weight")
    matrix = b.T
    out = node.outputs[0]
    users = list(dict.fromkeys(n for n, _ in out.uses()))
    if len(users) != 1 or out.is_graph_output() or not is_standard(users[0], "Add"):
        return matrix, None, None
    add = users[0]
    other = [v for v in add.inputs if v is not out]
    c = weight(other[0]) if len(other) == 1 else None
    bias = None if c is None else _per_class(c, matrix.shape[0])
    if bias is None:
        return matrix, None, None  # an Add of something else: it reads the layer's result
    return matrix, bias, add


def _per_class(c: np.ndarray, classes: int) -> np.ndarray | None:
    """A bias that broadcasts to ``(N, K)`` the same for every sample, as ``(K,)``; else None."""
    if c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1) or (c.ndim >= 1 and c.shape[-1] not in (1, classes)):
        return None
    return np.broadcast_to(c.reshape(-1).astype(np.float64), (classes,)).copy()


def _not_constant(what: str) -> str:
    return (f"its {what} is not a constant (an initializer, or a Constant, ConstantOfShape or Identity of one); "
            f"a convolution's weight must be one")


def spatial_axes(node: ir.Node, rank: int) -> list[int] | None:
    """The axes a ReduceMean or ReduceMax node reduces, normalized to
    ``[0, rank)``, from its ``axes`` attribute (before opset 18, 13 for
    ReduceSum) or input; None when not constant."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = constant_value(node.inputs[1])
        if axes is None:
            return None
        axes = [int(a) for a in axes.reshape(-1)]
    else:
        axes = attribute(node, "axes")
    if not axes:
        return [] if attribute(node, "noop_with_empty_axes", 0) else list(range(rank))
    return sorted(a % rank for a in axes)
