"""ONNX graphs that nobody here wrote, made reproducibly and offline, for the ONNX frontend's tests.

Five kinds of material, each with random non-degenerate weights, so that comparing
a rewritten graph's outputs with the original's proves something:

1. ``torchvision_export``: a torchvision classifier (Kaiming weights, random
   BatchNorm statistics, eval mode, batch 1) written by one of torch's exporters.
2. ``light_with_random_weights``: the Caffe2 graphs shipped inside the onnx package
   (``onnx/backend/test/data/light``), their constant weights replaced by random
   ones delivered as initializers or through ``Constant`` and ``Identity`` nodes.
3. ``maxpool_backend_cases``: onnx's own MaxPool node tests, with expected outputs.
4. ``tf2onnx_style_classifier``: NHWC graphs in the shape tf2onnx writes for Keras.
5. ``vnncomp_style_cnn`` / ``vnncomp_style_torch_export``: a tiny verification-benchmark CNN.

What torch 2.14 writes (measured; tests/test_onnx_material.py holds resnet18 to it)
-----------------------------------------------------------------------------------
``exporter="dynamo"`` (``torch.onnx.export(..., dynamo=True)``): opset 20, IR 10,
``<file>.onnx`` plus ``<file>.onnx.data``: every tensor over 256 bytes is external
data in the side file; the small ones (a folded bias of 64 channels, the int64 shape
constants) stay inline. BatchNorm after a Conv is folded into it (the Conv's bias is
then ``<weight name>_bias``); densenet121's pre-activation BatchNorms (62 of 121) stay.
Head: ``ReduceMean(x, axes=[-1, -2] as an input, keepdims=1) -> Reshape(constant
[1, C], allowzero=1) -> Gemm(transB=1)``. Node names are torch's (``conv2d_3``),
initializers the module paths (``layer1.0.conv1.weight``); nodes carry
``metadata_props`` and the graph 90-odd ``value_info``. An adaptive average pool
that upsamples (vgg11 at 64x64: 2x2 -> 7x7) becomes ``Transpose, Gather, GatherND,
Where, Div``; where it is the identity (vgg11 and alexnet at 224) an ``AveragePool``
of kernel 1.

``exporter="legacy"`` (``dynamo=False``): opset 20, IR 9, one self-contained file,
no value_info, no metadata. The same BatchNorm folding (the eval-mode peephole);
initializers of folded Convs are named ``onnx::Conv_193``, others by module path
(``fc.weight``). Head: ``GlobalAveragePool -> Flatten(axis=1) -> Gemm(transB=1)``
(alexnet and vgg11 at 224: ``AveragePool(kernel 1) -> Flatten -> Gemm``); densenet121
keeps 4 one-input Concats (62 Concats to dynamo's 58). In eval mode it deduplicates
initializers by value: one is kept and the others become ``Identity`` nodes of it.
Random weights have no equal tensors, so no ``Identity`` appears; ``zero_biases=True``
makes the (folded) biases equal and brings them. Dynamo deduplicates by value too,
but by sharing one initializer, and drops all-zero biases (Conv and Gemm alike).
The legacy exporter refuses an adaptive pool whose output size does not divide its
input ("output size that are not factor of input size"), hence 224 for vgg11 and alexnet.

Export times on this machine (2 cores beside a training job, so +-30 %; the first
dynamo export in a process pays about 1 s more of imports), at ``EXPORT_SIZES``::

    model          size  dynamo     legacy     files
    squeezenet1_1    67  1.0-1.3 s  0.4-0.5 s    5 MB   cheap
    resnet18         64  1.5-2.1 s  0.8-1.2 s   47 MB   cheap
    alexnet         224  2.2 s      1.8-2.6 s  244 MB   a big file
    googlenet        96  3.6-4.0 s  2.6-3.2 s   27 MB
    vgg11           224  2.2-4.0 s  4.9-6.9 s  531 MB   a big file
    densenet121      64  6.9-8.5 s  4.9-6.9 s   33 MB   slow

squeezenet1_1 and resnet18 are the cheap ones: both exporters together in 2 to 4 s.
"""
from __future__ import annotations

import enum
import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.backend.test.case.node as onnx_node_cases
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from convify.export.quiet import quiet_loggers, silenced_output

from zoo import MAXPOOL_ZOO, build

EXPORTERS = ("dynamo", "legacy")

# The default input size of each model: the smallest at which both exporters write a
# plain head. vgg11 and alexnet need 224, where their adaptive pool is the identity.
EXPORT_SIZES: dict[str, int] = {
    "resnet18": 64,
    "vgg11": 224,
    "alexnet": 224,
    "squeezenet1_1": 67,
    "googlenet": 96,
    "densenet121": 64,
}


# ---------------------------------------------------------------- running and checking

def ort_session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    """A quiet CPU onnxruntime session on two threads (a file keeps its external data)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # IR 3 graphs warn that their initializers are inputs
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_onnx(model: onnx.ModelProto | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """All graph outputs of one onnxruntime run."""
    return ort_session(model).run(None, feeds)


def data_inputs(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """The graph inputs a caller feeds (not initializers), a symbolic dimension as 1."""
    weights = {t.name for t in model.graph.initializer}
    return {i.name: tuple(d.dim_value if d.HasField("dim_value") else 1 for d in i.type.tensor_type.shape.dim)
            for i in model.graph.input if i.name not in weights}


def random_feeds(model: onnx.ModelProto, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Standard normal float32 values for every data input."""
    return {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in data_inputs(model).items()}


def softmax_input(model: onnx.ModelProto) -> str | None:
    """The tensor a graph output's final Softmax reads (the logits), if an output comes from one."""
    outputs = {o.name for o in model.graph.output}
    return next((n.input[0] for n in model.graph.node if n.op_type == "Softmax" and n.output[0] in outputs), None)


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the float tensors ``names`` (e.g. the logits)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    return out


def input_dependence(a: np.ndarray, b: np.ndarray) -> float:
    """``max|a - b| / max(|a|, |b|)``: how much an output changed between two inputs."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(a).max(), np.abs(b).max(), 1e-30)
    return float(np.abs(a - b).max() / scale)


def check_model(model: onnx.ModelProto | Path) -> None:
    """``onnx.checker.check_model`` with ``full_check`` (a path keeps its external data)."""
    onnx.checker.check_model(str(model) if isinstance(model, Path) else model, full_check=True)


# ---------------------------------------------------------------- 1. torchvision exports

def torchvision_model(name: str, seed: int = 0, *, zero_biases: bool = False) -> nn.Module:
    """The torchvision classifier ``torchvision_export`` writes, in eval mode (tests/zoo.py's
    build); ``zero_biases`` zeroes every bias, BatchNorm shift and running mean."""
    if name not in EXPORT_SIZES:
        raise ValueError(f"no export size for {name!r}; known: {', '.join(EXPORT_SIZES)}")
    model = build(name, seed, **MAXPOOL_ZOO.get(name, (0, {}))[1])
    if zero_biases:
        with torch.no_grad():
            for key, tensor in model.state_dict().items():
                if key.endswith((".bias", ".running_mean")):
                    tensor.zero_()
    return model


def torchvision_export(name: str, exporter: str, folder: Path, *, size: int | None = None, seed: int = 0,
                       zero_biases: bool = False) -> Path:
    """Export ``torchvision_model(name, seed, zero_biases=...)`` at batch 1 and ``size``
    (``EXPORT_SIZES[name]`` by default) to ``folder/<name>_<size>_<exporter>[_zero_biases].onnx``,
    quietly. Input ``input``, output ``logits``; what each exporter writes is in this
    module's docstring. With ``zero_biases`` the legacy exporter shares the equal (zero)
    biases through ``Identity`` nodes and the dynamo exporter drops them.

    >>> torchvision_export("resnet18", "dynamo", tmp_path)
    PosixPath('.../resnet18_64_dynamo.onnx')  # and resnet18_64_dynamo.onnx.data beside it
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, not {exporter!r}")
    model = torchvision_model(name, seed, zero_biases=zero_biases)
    size = size or EXPORT_SIZES[name]
    example = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    path = Path(folder) / f"{name}_{size}_{exporter}{'_zero_biases' if zero_biases else ''}.onnx"
    with warnings.catch_warnings(), silenced_output(), quiet_loggers():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=exporter == "dynamo",
                          input_names=["input"], output_names=["logits"])
    return path


# ---------------------------------------------------------------- 2. onnx's light models

LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def light_zoo() -> list[Path]:
    """The Caffe2 graphs shipped with onnx (IR 3, opset 9), their weights made by
    ``ConstantOfShape`` nodes (all 0.02) and a few initializers. Input ``[1, 3, 224, 224]``
    (the Reshapes' shapes are constants for that size) named ``gpu_0/data_0`` in resnet50,
    shufflenet and zfnet512, ``data_0`` elsewhere; output ``[1, 1000]`` from a Softmax
    (``prob_1``, or ``gpu_0/softmax_1`` in those three), but squeezenet's
    ``softmaxout_1`` is ``[1, 1000, 1, 1]`` and densenet121's ``fc6_1`` ``[1, 1000, 1, 1]``
    comes from a 1x1 Conv, no Softmax. Cost of one
    variant here (random weights, the checker, an onnxruntime session, two runs)::

        squeezenet 0.1 s (1.2 M weights)   shufflenet 0.2 s (1.4 M)   inception_v1 0.5 s (7.0 M)
        inception_v2 0.8 s (11 M)          densenet121 0.9 s (8.1 M)  resnet50 1.4 s (26 M)
        bvlc_alexnet 4 s (61 M)            zfnet512 6 s (87 M)         vgg19 11 s (144 M)

    Besides ConstantOfShape they have: LRN, Dropout with its mask output (unused), a
    Reshape of a weight before its Gemm (inception_v1), BatchNormalization followed by
    an Unsqueeze-Mul-Add channel affine (densenet121, inception_v2), Sum (resnet50,
    shufflenet), channel shuffles as Reshape-Transpose-Reshape (shufflenet), MaxPool
    and AveragePool with asymmetric pads ``[0, 0, 1, 1]`` (Caffe's ceil mode), an
    unused initializer (resnet50, zfnet512).
    """
    return sorted(LIGHT_DIR.glob("*.onnx"))


class WeightDelivery(enum.Enum):
    """How ``light_with_random_weights`` hands a graph its random weights."""

    INITIALIZERS = "initializers"  # every ConstantOfShape becomes an initializer (and an input: IR 3)
    NODES = "nodes"  # alternately a Constant node and an Identity of an initializer


# The ops a weight passes through unchanged in meaning on its way to its consumer.
_WEIGHT_CARRIERS = frozenset({"Reshape", "Unsqueeze", "Identity"})
# The ops between a classifier and its Softmax that leave the values as they are.
_SHAPE_ONLY = frozenset({"Reshape", "Flatten", "Squeeze", "Identity", "Dropout"})


@dataclass(frozen=True)
class _WeightUse:
    """Where a weight ends up: the consuming op, the input slot and the tensor's shape there."""

    op_type: str
    slot: int
    node: onnx.NodeProto
    shape_there: tuple[int, ...] | None


def light_with_random_weights(path: Path, rng: np.random.Generator,
                              delivery: WeightDelivery = WeightDelivery.INITIALIZERS) -> onnx.ModelProto:
    """A light model whose every float weight is random and non-degenerate: Kaiming normal
    Conv and Gemm weights, N(0, 0.1) biases, BatchNorm (and the Mul/Add channel affines
    of densenet121 and inception_v2) scales in U(0.5, 1.5), means N(0, 0.1), variances in
    U(0.5, 1.5); a BatchNorm ending a residual branch beside an identity shortcut gets
    scales in U(0.1, 0.3). The weights that were ``ConstantOfShape`` outputs arrive as
    ``delivery`` says; those that were initializers stay initializers, with new values;
    the int64 shape tensors and unused initializers stay as they were. IR 3 is kept, so
    every initializer is also a graph input. The same ``rng`` state gives the same values
    under either delivery.

    >>> m = light_with_random_weights(light_zoo()[0], np.random.default_rng(0), WeightDelivery.NODES)
    """
    model = onnx.load(str(path))
    graph = model.graph
    index = _GraphIndex.of(model)
    initializers = {t.name: t for t in graph.initializer}

    for tensor in graph.initializer:
        if tensor.data_type == TensorProto.FLOAT and index.consumers.get(tensor.name):
            values = _random_weight(tensor.name, tuple(tensor.dims), index, rng)
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))

    new_nodes: list[onnx.NodeProto] = []
    spent_shapes: set[str] = set()
    made = 0
    for node in graph.node:
        if node.op_type != "ConstantOfShape":
            new_nodes.append(node)
            continue
        shape = tuple(int(d) for d in numpy_helper.to_array(initializers[node.input[0]]))
        spent_shapes.add(node.input[0])
        values = _random_weight(node.output[0], shape, index, rng)
        new_nodes.extend(_deliver(graph, node, values, delivery, made))
        made += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    _drop_initializers(graph, spent_shapes - {i for n in graph.node for i in n.input})
    return model


def _deliver(graph: onnx.GraphProto, node: onnx.NodeProto, values: np.ndarray,
             delivery: WeightDelivery, index: int) -> list[onnx.NodeProto]:
    """Hand ``values`` to ``node``'s output as ``delivery`` says; the nodes that replace ``node``."""
    name = node.output[0]
    if delivery is WeightDelivery.NODES and index % 2 == 0:
        return [helper.make_node("Constant", [], [name], name=node.name, value=numpy_helper.from_array(values))]
    stored = name if delivery is WeightDelivery.INITIALIZERS else f"{name}__init"
    graph.initializer.append(numpy_helper.from_array(values, stored))
    graph.input.append(helper.make_tensor_value_info(stored, TensorProto.FLOAT, values.shape))
    if delivery is WeightDelivery.INITIALIZERS:
        return []
    return [helper.make_node("Identity", [stored], [name], name=node.name)]


def _drop_initializers(graph: onnx.GraphProto, names: set[str]) -> None:
    """Remove initializers ``names`` and their graph inputs."""
    kept = [t for t in graph.initializer if t.name not in names]
    inputs = [i for i in graph.input if i.name not in names]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.input[:]
    graph.input.extend(inputs)


@dataclass(frozen=True)
class _GraphIndex:
    """Who reads and who writes each tensor, and the static shapes shape inference finds."""

    consumers: dict[str, list[tuple[onnx.NodeProto, int]]]
    producers: dict[str, onnx.NodeProto]
    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def of(cls, model: onnx.ModelProto) -> _GraphIndex:
        consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in model.graph.node:
            for slot, name in enumerate(node.input):
                consumers.setdefault(name, []).append((node, slot))
        producers = {out: node for node in model.graph.node for out in node.output}
        # data propagation resolves the ConstantOfShape sizes and the Reshapes of weights
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        shapes = {}
        for info in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
            dims = info.type.tensor_type.shape.dim
            if all(d.HasField("dim_value") for d in dims):
                shapes[info.name] = tuple(d.dim_value for d in dims)
        return cls(consumers, producers, shapes)

    def feeds_softmax(self, node: onnx.NodeProto) -> bool:
        """``node``'s output reaches a Softmax through shape-only ops (it makes the logits)."""
        for user, _ in self.consumers.get(node.output[0], []):
            if user.op_type == "Softmax" or (user.op_type in _SHAPE_ONLY and self.feeds_softmax(user)):
                return True
        return False

    def ends_residual_branch(self, node: onnx.NodeProto) -> bool:
        """``node``'s output is summed with a tensor no BatchNormalization made (an identity shortcut)."""
        for user, _ in self.consumers.get(node.output[0], []):
            if user.op_type in ("Sum", "Add") and any(
                    self.producers.get(i) is not None and self.producers[i].op_type != "BatchNormalization"
                    for i in user.input if i != node.output[0]):
                return True
        return False


def _final_use(name: str, index: _GraphIndex) -> _WeightUse:
    """Follow ``name`` through Reshape/Unsqueeze/Identity to the op that uses it as a weight."""
    uses = index.consumers.get(name, [])
    if not uses:
        raise ValueError(f"weight {name!r} is not used by any node")
    node, slot = uses[0]
    if node.op_type in _WEIGHT_CARRIERS and slot == 0:
        return _final_use(node.output[0], index)
    return _WeightUse(node.op_type, slot, node, index.shapes.get(name))


def _random_weight(name: str, shape: tuple[int, ...], index: _GraphIndex, rng: np.random.Generator) -> np.ndarray:
    """Random values for weight ``name`` as its use asks (Kaiming, bias, BatchNorm statistic)."""
    use = _final_use(name, index)
    role = (use.op_type, use.slot)
    if role == ("Conv", 1):
        return _normal(rng, shape, math.sqrt(2.0 / math.prod(shape[1:])))
    if role == ("Gemm", 1):
        there = use.shape_there or shape
        trans_b = next((a.i for a in use.node.attribute if a.name == "transB"), 0)
        # Logits of about 100 (a random net's features are large and positive) saturate the
        # Softmax, whose output then hardly depends on the input: a tenth keeps them near 10.
        damping = 0.1 if index.feeds_softmax(use.node) else 1.0
        return _normal(rng, shape, damping * math.sqrt(2.0 / there[1 if trans_b else 0]))
    if role in {("Conv", 2), ("Gemm", 2), ("BatchNormalization", 2), ("BatchNormalization", 3), ("Add", 0),
                ("Add", 1)}:
        return _normal(rng, shape, 0.1)
    if role == ("BatchNormalization", 1) and index.ends_residual_branch(use.node):
        # Sixteen identity-shortcut blocks whose branches keep their input's scale would
        # multiply resnet50's output by 2**8 and saturate its Softmax: damp the branch
        # (the reasoning of Fixup and of zero-initialized last BatchNorm scales).
        return rng.uniform(0.1, 0.3, shape).astype(np.float32)
    if role in {("BatchNormalization", 1), ("BatchNormalization", 4), ("Mul", 0), ("Mul", 1)}:
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    raise ValueError(f"weight {name!r} feeds {use.op_type} input {use.slot}: no random law for it")


def _normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)


# ---------------------------------------------------------------- 3. onnx's MaxPool node tests

@dataclass(frozen=True)
class BackendCase:
    """One onnx backend node test: a one-node graph, its inputs and expected outputs."""

    name: str
    model: onnx.ModelProto
    inputs: tuple[np.ndarray, ...]
    outputs: tuple[np.ndarray, ...]

    @property
    def node(self) -> onnx.NodeProto:
        return self.model.graph.node[0]

    @property
    def attributes(self) -> dict[str, object]:
        return {a.name: helper.get_attribute_value(a) for a in self.node.attribute}

    @property
    def spatial_rank(self) -> int:
        """1, 2 or 3."""
        return self.inputs[0].ndim - 2

    @property
    def has_indices(self) -> bool:
        """The second (Indices) output is a graph output."""
        return len(self.node.output) > 1 and bool(self.node.output[1])

    @property
    def integer_input(self) -> bool:
        return bool(np.issubdtype(self.inputs[0].dtype, np.integer))

    @property
    def auto_pad(self) -> str:
        value = self.attributes.get("auto_pad", b"NOTSET")
        return value.decode() if isinstance(value, bytes) else str(value)

    @property
    def ceil_mode(self) -> bool:
        return bool(self.attributes.get("ceil_mode", 0))

    @property
    def dilated(self) -> bool:
        return any(d != 1 for d in self.attributes.get("dilations", []))

    @property
    def effective_pads(self) -> tuple[int, ...]:
        """Begin pads then end pads, as ``pads`` orders them, with ``auto_pad`` worked out
        (the ceil_mode overhang not counted)."""
        att = self.attributes
        kernel = list(att["kernel_shape"])
        rank = len(kernel)
        if self.auto_pad in ("NOTSET", "VALID"):
            return tuple(att.get("pads", [0] * 2 * rank)) if self.auto_pad == "NOTSET" else (0,) * 2 * rank
        strides = list(att.get("strides", [1] * rank))
        dilations = list(att.get("dilations", [1] * rank))
        begins, ends = [], []
        for size, k, s, d in zip(self.inputs[0].shape[2:], kernel, strides, dilations):
            total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
            small, large = total // 2, total - total // 2
            begins.append(small if self.auto_pad == "SAME_UPPER" else large)
            ends.append(large if self.auto_pad == "SAME_UPPER" else small)
        return (*begins, *ends)

    @property
    def asymmetric_pads(self) -> bool:
        pads = self.effective_pads
        half = len(pads) // 2
        return pads[:half] != pads[half:]


@functools.cache
def maxpool_backend_cases() -> tuple[BackendCase, ...]:
    """The MaxPool node tests of onnx's backend suite (19 in onnx 1.23, all opset 22,
    IR 10, one data set each), generated offline by ``collect_testcases`` (about 4 s
    once per process: it runs every op's generator; onnx keeps the list).

    Among them (see the ``BackendCase`` properties): 2 with the Indices output as a
    graph output (``with_argmax``, one ``storage_order=1``), 1 uint8 input, 3 ``auto_pad``
    (``SAME_UPPER`` k3/s2 on 5x5, symmetric; ``SAME_UPPER`` and ``SAME_LOWER`` k2 on
    32x32, asymmetric), 3 ``ceil_mode`` (one where it removes an output row), 4 dilated,
    1 in 1d, 4 in 3d. No case has asymmetric explicit ``pads``. onnxruntime 1.32
    reproduces all 19.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy overflow warnings of other ops' generators
        collected = onnx_node_cases.collect_testcases("MaxPool")
    cases = []
    for case in collected:  # the list is onnx's own, shared by every op_type asked for
        if case.kind != "node" or case.model.graph.node[0].op_type != "MaxPool":
            continue
        for number, (inputs, outputs) in enumerate(case.data_sets):
            suffix = f"_{number}" if len(case.data_sets) > 1 else ""
            cases.append(BackendCase(case.name + suffix, case.model, tuple(inputs), tuple(outputs)))
    return tuple(cases)


# ---------------------------------------------------------------- 4. tf2onnx-style graphs

class Head(enum.Enum):
    """The classifier head of ``tf2onnx_style_classifier``."""

    # Transpose to NHWC -> Reshape [-1, H*W*C] -> MatMul -> Add -> Relu -> MatMul -> Add
    RESHAPE_MATMUL = "reshape_matmul"
    # Transpose to NHWC -> Flatten -> Gemm(transB=1, alpha=0.5, beta=2) -> Relu -> Gemm(transB=1, alpha=1.5, no C)
    FLATTEN_GEMM = "flatten_gemm"
    # GlobalAveragePool -> Flatten -> Gemm -> Relu -> Gemm (weights [K, N], transB=0)
    GLOBAL_POOL_GEMM = "global_pool_gemm"
    # ReduceMean(axes 2, 3) -> Reshape [-1, C] -> Gemm -> Relu -> Gemm (the same weights)
    REDUCE_MEAN_GEMM = "reduce_mean_gemm"


class Between(enum.Enum):
    """What sits between the two dense layers (after the first Relu)."""

    NOTHING = "nothing"
    DROPOUT = "dropout"
    IDENTITY = "identity"


_TF_PREFIX = "StatefulPartitionedCall/sequential"


def tf2onnx_style_classifier(*, head: Head = Head.RESHAPE_MATMUL, opset: int = 13, height: int = 16,
                             width: int = 16, channels: int = 3, classes: int = 10, hidden: int = 32,
                             computed_shape: bool = False, bias_left: bool = False, keepdims: bool = True,
                             between: Between = Between.NOTHING, softmax: bool = True,
                             seed: int = 0) -> onnx.ModelProto:
    """A Keras-like CNN as tf2onnx writes it: input ``input_1`` NHWC ``[1, H, W, C]`` ->
    Transpose(0, 3, 1, 2) -> Conv 3x3 (8, bias) -> Relu -> MaxPool 3x3/2 ``SAME_UPPER``
    -> Conv 3x3 (16) -> Relu -> MaxPool 3x3/2 with explicit pads (TF's SAME worked out,
    asymmetric for an even size) -> ``head`` -> optional Softmax -> output ``dense_1``.

    Options (a ``ValueError`` where one does not apply to ``head``):
        computed_shape: (RESHAPE_MATMUL) the Reshape's shape from Shape -> Gather ->
            Unsqueeze -> Concat instead of a constant ``[-1, H*W*C]``.
        bias_left: (RESHAPE_MATMUL) ``Add(bias, x)`` instead of ``Add(x, bias)``.
        keepdims: (REDUCE_MEAN_GEMM) the ReduceMean's ``keepdims``; its axes are an
            attribute below opset 18 and an input from 18 on.
        between: a Dropout or Identity between the dense layers.

    The same ``seed`` and ``head`` give the same weights whatever the other options, so
    variants of one head compute the same function; GLOBAL_POOL_GEMM and REDUCE_MEAN_GEMM
    too. Checker-clean and run by onnxruntime at opsets 11 to 21 (IR the lowest the opset allows).
    """
    _refuse_foreign_options(head, computed_shape, bias_left, keepdims)
    rng = np.random.default_rng(seed)
    b = _GraphBuilder(opset)
    x = b.input("input_1", [1, height, width, channels])
    x = b.node("Transpose", [x], perm=[0, 3, 1, 2], name="conv2d/Conv2D__6")
    x = b.conv("conv2d", x, _kaiming(rng, (8, channels, 3, 3)), _normal(rng, (8,), 0.1))
    x = b.node("Relu", [x], name="conv2d/Relu")
    x = b.node("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER",
               name="max_pooling2d/MaxPool")
    x = b.conv("conv2d_1", x, _kaiming(rng, (16, 8, 3, 3)), _normal(rng, (16,), 0.1))
    x = b.node("Relu", [x], name="conv2d_1/Relu")
    h1, w1 = -(-height // 2), -(-width // 2)
    x = b.node("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=_tf_same_pads((h1, w1), 3, 2),
               name="max_pooling2d_1/MaxPool")
    h2, w2 = -(-h1 // 2), -(-w1 // 2)
    features = h2 * w2 * 16 if head in (Head.RESHAPE_MATMUL, Head.FLATTEN_GEMM) else 16
    w_1, b_1 = _kaiming(rng, (features, hidden)), _normal(rng, (hidden,), 0.1)
    w_2, b_2 = _kaiming(rng, (hidden, classes)), _normal(rng, (classes,), 0.1)

    if head is Head.RESHAPE_MATMUL:
        x = b.node("Transpose", [x], perm=[0, 2, 3, 1], name="max_pooling2d_1/MaxPool__20")
        x = b.node("Reshape", [x, _reshape_target(b, x, features, computed_shape)], name="flatten/Reshape")
        x = b.dense_matmul("dense", x, w_1, b_1, bias_left)
        x = _between(b, b.node("Relu", [x], name="dense/Relu"), between)
        x = b.dense_matmul("dense_1", x, w_2, b_2, bias_left)
    elif head is Head.FLATTEN_GEMM:
        x = b.node("Transpose", [x], perm=[0, 2, 3, 1], name="max_pooling2d_1/MaxPool__20")
        x = b.node("Flatten", [x], axis=1, name="flatten/Reshape")
        x = b.node("Gemm", [x, b.const("dense/kernel", (w_1 / 0.5).T), b.const("dense/bias", b_1 / 2.0)],
                   transB=1, alpha=0.5, beta=2.0, name="dense/MatMul")
        x = _between(b, b.node("Relu", [x], name="dense/Relu"), between)
        x = b.node("Gemm", [x, b.const("dense_1/kernel", (w_2 / 1.5).T)], transB=1, alpha=1.5, name="dense_1/MatMul")
    else:
        if head is Head.GLOBAL_POOL_GEMM:
            x = b.node("GlobalAveragePool", [x], name="global_average_pooling2d/Mean")
            x = b.node("Flatten", [x], axis=1, name="global_average_pooling2d/Flatten")
        else:
            x = _reduce_mean(b, x, keepdims)
            x = b.node("Reshape", [x, b.const("flatten/shape", np.array([-1, 16], np.int64))], name="flatten/Reshape")
        x = b.node("Gemm", [x, b.const("dense/kernel", w_1), b.const("dense/bias", b_1)], name="dense/MatMul")
        x = _between(b, b.node("Relu", [x], name="dense/Relu"), between)
        x = b.node("Gemm", [x, b.const("dense_1/kernel", w_2), b.const("dense_1/bias", b_2)], name="dense_1/MatMul")
    if softmax:
        x = b.node("Softmax", [x], name="dense_1/Softmax")
    return b.model("dense_1", [1, classes], "tf2onnx")


def _refuse_foreign_options(head: Head, computed_shape: bool, bias_left: bool, keepdims: bool) -> None:
    """An option the head does not have is an error, not a silent no-op."""
    if (computed_shape or bias_left) and head is not Head.RESHAPE_MATMUL:
        raise ValueError(f"computed_shape and bias_left apply to Head.RESHAPE_MATMUL only, not {head}")
    if not keepdims and head is not Head.REDUCE_MEAN_GEMM:
        raise ValueError(f"keepdims applies to Head.REDUCE_MEAN_GEMM only, not {head}")


def _tf_same_pads(size: tuple[int, int], kernel: int, stride: int) -> list[int]:
    """TensorFlow's SAME padding as explicit ONNX pads (the extra one at the end)."""
    totals = [max(0, (-(-n // stride) - 1) * stride + kernel - n) for n in size]
    return [t // 2 for t in totals] + [t - t // 2 for t in totals]


def _reshape_target(b: _GraphBuilder, x: str, features: int, computed: bool) -> str:
    """The Reshape's shape: a constant, or computed from ``x``'s batch size."""
    if not computed:
        return b.const("flatten/Const", np.array([-1, features], np.int64))
    shape = b.node("Shape", [x], name="flatten/Shape")
    batch = b.node("Gather", [shape, b.const("flatten/strided_slice/index", np.array(0, np.int64))], axis=0,
                   name="flatten/strided_slice")
    batch = b.unsqueeze(batch, "flatten/Reshape/shape_Unsqueeze")
    return b.node("Concat", [batch, b.const("flatten/Reshape/shape_1", np.array([features], np.int64))], axis=0,
                  name="flatten/Reshape/shape_Concat")


def _reduce_mean(b: _GraphBuilder, x: str, keepdims: bool) -> str:
    """ReduceMean over H and W: axes an attribute before opset 18, an input from 18 on."""
    name = "global_average_pooling2d/Mean"
    if b.opset >= 18:
        return b.node("ReduceMean", [x, b.const("global_average_pooling2d/axes", np.array([2, 3], np.int64))],
                      keepdims=int(keepdims), name=name)
    return b.node("ReduceMean", [x], axes=[2, 3], keepdims=int(keepdims), name=name)


def _between(b: _GraphBuilder, x: str, between: Between) -> str:
    if between is Between.DROPOUT:
        return b.node("Dropout", [x], name="dropout/Identity")
    if between is Between.IDENTITY:
        return b.node("Identity", [x], name="dropout/Identity")
    return x


def _kaiming(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """He-normal weights; the fan-in is every dimension but the output one (dense: [K, N], conv: OIHW)."""
    fan_in = shape[0] if len(shape) == 2 else math.prod(shape[1:])
    return _normal(rng, shape, math.sqrt(2.0 / fan_in))


class _GraphBuilder:
    """Collects nodes and initializers; every node's output is named after the node."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []

    def input(self, name: str, shape: list[int]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        return name

    def const(self, name: str, values: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(values), _TF_PREFIX + "/" + name))
        return self.initializers[-1].name

    def node(self, op_type: str, inputs: list[str], *, name: str, **attributes: object) -> str:
        full = f"{_TF_PREFIX}/{name}"
        self.nodes.append(helper.make_node(op_type, inputs, [f"{full}:0"], name=full, **attributes))
        return self.nodes[-1].output[0]

    def conv(self, name: str, x: str, weight: np.ndarray, bias: np.ndarray) -> str:
        pads = [weight.shape[2] // 2, weight.shape[3] // 2] * 2
        return self.node("Conv", [x, self.const(f"{name}/kernel", weight), self.const(f"{name}/bias", bias)],
                         kernel_shape=list(weight.shape[2:]), strides=[1, 1], dilations=[1, 1], pads=pads,
                         name=f"{name}/Conv2D")

    def dense_matmul(self, name: str, x: str, weight: np.ndarray, bias: np.ndarray, bias_left: bool) -> str:
        x = self.node("MatMul", [x, self.const(f"{name}/MatMul/ReadVariableOp", weight)], name=f"{name}/MatMul")
        bias_name = self.const(f"{name}/BiasAdd/ReadVariableOp", bias)
        return self.node("Add", [bias_name, x] if bias_left else [x, bias_name], name=f"{name}/BiasAdd")

    def unsqueeze(self, x: str, name: str) -> str:
        if self.opset >= 13:
            return self.node("Unsqueeze", [x, self.const(f"{name}/axes", np.array([0], np.int64))], name=name)
        return self.node("Unsqueeze", [x], axes=[0], name=name)

    def model(self, output: str, output_shape: list[int], producer: str) -> onnx.ModelProto:
        """The model, the last node's value renamed to the graph output ``output``."""
        self.nodes[-1].output[0] = output
        graph = helper.make_graph(self.nodes, producer, self.inputs,
                                  [helper.make_tensor_value_info(output, TensorProto.FLOAT, output_shape)],
                                  self.initializers)
        opsets = [helper.make_opsetid("", self.opset)]
        return helper.make_model(graph, opset_imports=opsets, producer_name=producer,
                                  ir_version=helper.find_min_ir_version_for(opsets))


# ---------------------------------------------------------------- 5. a VNN-COMP-like CNN

class VnnCompCnn(nn.Module):
    """Conv(4, 3x3, pad 1) -> Relu -> MaxPool 2 -> Conv(8, 3x3, pad 1) -> Relu -> MaxPool 2
    -> Flatten -> Linear(32) -> Relu -> Linear(10): the size of a VNN-COMP MNIST/CIFAR CNN."""

    def __init__(self, in_channels: int = 1, size: int = 28, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * (size // 4) ** 2, 32)
        self.fc2 = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def vnncomp_style_torch(*, in_channels: int = 1, size: int = 28, seed: int = 0) -> VnnCompCnn:
    """The network of ``vnncomp_style_cnn`` as a torch module, Kaiming weights, eval mode."""
    torch_seed = torch.Generator().manual_seed(seed)
    model = VnnCompCnn(in_channels, size)
    with torch.no_grad():
        for module in (model.conv1, model.conv2, model.fc1, model.fc2):
            fan_in = module.weight[0].numel()
            module.weight.copy_(torch.randn(module.weight.shape, generator=torch_seed) * (2.0 / fan_in) ** 0.5)
            module.bias.copy_(torch.randn(module.bias.shape, generator=torch_seed) * 0.1)
    return model.eval()


def vnncomp_style_cnn(*, in_channels: int = 1, size: int = 28, opset: int = 13, seed: int = 0) -> onnx.ModelProto:
    """``vnncomp_style_torch``'s network written with ``onnx.helper``: input ``input``
    ``[1, C, size, size]``, Conv -> Relu -> MaxPool -> Conv -> Relu -> MaxPool -> Flatten
    -> Gemm(transB=1) -> Relu -> Gemm -> output ``output`` ``[1, 10]``. Same seed, same
    weights as the torch module, so their outputs agree to float rounding."""
    state = {k: v.numpy() for k, v in vnncomp_style_torch(in_channels=in_channels, size=size, seed=seed)
             .state_dict().items()}
    nodes = [
        helper.make_node("Conv", ["input", "conv1.weight", "conv1.bias"], ["c1"], name="conv1",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "conv2.weight", "conv2.bias"], ["c2"], name="conv2",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("MaxPool", ["r2"], ["p2"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p2"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc1.weight", "fc1.bias"], ["f1"], name="fc1", transB=1),
        helper.make_node("Relu", ["f1"], ["r3"], name="relu3"),
        helper.make_node("Gemm", ["r3", "fc2.weight", "fc2.bias"], ["output"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "vnncomp_style_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, in_channels, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 10])],
        [numpy_helper.from_array(v, k) for k, v in state.items()])
    opsets = [helper.make_opsetid("", opset)]
    return helper.make_model(graph, opset_imports=opsets, producer_name="convify-tests",
                             ir_version=helper.find_min_ir_version_for(opsets))


def vnncomp_style_torch_export(folder: Path, *, exporter: str = "legacy", in_channels: int = 1, size: int = 28,
                               seed: int = 0) -> Path:
    """``vnncomp_style_torch`` exported to ``folder/vnncomp_style_<exporter>.onnx`` (input
    ``input``, output ``output``); legacy: Conv, Relu, MaxPool, Flatten, Gemm in one file."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, not {exporter!r}")
    model = vnncomp_style_torch(in_channels=in_channels, size=size, seed=seed)
    path = Path(folder) / f"vnncomp_style_{exporter}.onnx"
    with warnings.catch_warnings(), silenced_output(), quiet_loggers():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, in_channels, size, size),), str(path),
                          dynamo=exporter == "dynamo", input_names=["input"], output_names=["output"])
    return path
