"""The ONNX frontend: the core's rewrites applied to ONNX graphs, through onnx-ir.

A sibling of :mod:`convify.fx` (neither imports the other): it reads a model
(:mod:`.files`), reads its values (:mod:`.values`), proves signs
(:mod:`.nonnegative`) and applies each rewrite's ONNX implementation
(:mod:`.rewrites`), keeping every node it does not rewrite as it was.
Importing this package imports no ONNX package (:mod:`.detect` tells an ONNX
model without one); its names load on first use.

>>> from convify.onnx import read_model, rewrite_onnx, report_of, write_model
>>> from convify.core.rewrites.maxpool import MaxPoolOptions
>>> model = rewrite_onnx("resnet18.onnx", MaxPoolOptions(mode="exact"))
>>> write_model(model, "resnet18_exact.onnx")
>>> print(report_of("resnet18_exact.onnx"))
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"REPORT_KEY": "convify.onnx.engine", "report_of": "convify.onnx.engine",
         "rewrite_onnx": "convify.onnx.engine", "read_model": "convify.onnx.files",
         "to_proto": "convify.onnx.files", "write_model": "convify.onnx.files", "is_onnx": "convify.onnx.detect"}

__all__ = ["REPORT_KEY", "is_onnx", "read_model", "report_of", "rewrite_onnx", "to_proto", "write_model"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'convify.onnx' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
