"""Tiny ONNX models built with onnx.helper for the ONNX frontend's tests, and running them."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

FLOAT_TYPES = {np.float32: TensorProto.FLOAT, np.float64: TensorProto.DOUBLE, np.float16: TensorProto.FLOAT16}


def elem(dtype: Any) -> int:
    return FLOAT_TYPES.get(np.dtype(dtype).type) or helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def pool_model(shape: Sequence[Any], *, before: Sequence[str] = (), dtype: Any = np.float32, opset: int = 22,
               name: str = "pool", out_shape: Sequence[Any] | None = None, ir_version: int | None = None,
               indices: str | None = None, after: Sequence[str] = ("Identity",), **attrs: Any) -> onnx.ModelProto:
    """``x -> [before ops] -> MaxPool(**attrs) -> [after ops] -> y``, nodes named ``pre0``, ``pool``, ``post0``.

    ``indices``: None (one output), "unused" (a second output nobody reads) or "output" (a graph output).
    """
    t = elem(dtype)
    nodes, cur = [], "x"
    for i, op in enumerate(before):
        nodes.append(helper.make_node(op, [cur], [f"b{i}"], name=f"pre{i}"))
        cur = f"b{i}"
    outs = ["p"] + (["idx"] if indices else [])
    nodes.append(helper.make_node("MaxPool", [cur], outs, name=name, **attrs))
    cur = "p"
    for i, op in enumerate(after):
        nodes.append(helper.make_node(op, [cur], [f"a{i}"], name=f"post{i}"))
        cur = f"a{i}"
    nodes.append(helper.make_node("Identity", [cur], ["y"], name="last"))
    outputs = [helper.make_tensor_value_info("y", t, out_shape)] if out_shape is not None else [
        helper.make_tensor_value_info("y", t, None)]
    if indices == "output":
        outputs.append(helper.make_tensor_value_info("idx", TensorProto.INT64, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", t, list(shape))], outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if ir_version is not None:
        model.ir_version = ir_version
    return onnx.shape_inference.infer_shapes(model) if out_shape is None else model


def run(model: onnx.ModelProto, *inputs: np.ndarray) -> list[np.ndarray]:
    """The model's outputs in onnxruntime (CPU, one thread)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, dict(zip(names, inputs)))


def reference(model: onnx.ModelProto, *inputs: np.ndarray) -> list[np.ndarray]:
    """The model's outputs by ONNX's reference evaluator (float64 Conv, which onnxruntime's CPU lacks)."""
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(model)
    names = [i.name for i in model.graph.input]
    return evaluator.run(None, dict(zip(names, inputs)))


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|."""
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = float(np.max(np.abs(b))) if b.size else 1.0
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) / (scale or 1.0) if b.size else 0.0
