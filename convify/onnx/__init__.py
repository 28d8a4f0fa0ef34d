"""The ONNX frontend: the core's rewrites applied to ONNX graphs, through onnx-ir.

A sibling of :mod:`convify.fx` (neither imports the other): it reads a model
(:mod:`.files`), reads its values (:mod:`.values`), proves signs
(:mod:`.nonnegative`) and applies each rewrite's ONNX implementation
(:mod:`.rewrites`), keeping every node it does not rewrite as it was.

>>> from convify.onnx import read_model, rewrite_onnx, report_of, write_model
>>> from convify.core.rewrites.maxpool import MaxPoolOptions
>>> model = rewrite_onnx("resnet18.onnx", MaxPoolOptions(mode="exact"))
>>> write_model(model, "resnet18_exact.onnx")
>>> print(report_of("resnet18_exact.onnx"))
"""
from __future__ import annotations

from convify.onnx.engine import REPORT_KEY, report_of, rewrite_onnx
from convify.onnx.files import read_model, to_proto, write_model

__all__ = ["REPORT_KEY", "read_model", "report_of", "rewrite_onnx", "to_proto", "write_model"]
