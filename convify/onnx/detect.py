"""Whether something is an ONNX model, without importing onnx for what is not one.

An ONNX model here: an ``onnx.ModelProto``, an ``onnx_ir.Model``, or a path
(``str`` or ``os.PathLike``) whose name ends in ``.onnx``. The entry points
(``convify.replace_maxpool``, ``verify``, ...) ask this before choosing the
frontend, so PyTorch users never pay for onnx's import.
"""
from __future__ import annotations

import os
from typing import Any


def is_onnx(model: Any) -> bool:
    """Whether ``model`` is an ONNX model (a proto, an ``onnx_ir.Model``, or a ``.onnx`` path).

    >>> is_onnx("resnet18.onnx"), is_onnx("resnet18.pt")
    (True, False)
    """
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model).lower().endswith(".onnx")
    module = type(model).__module__ or ""
    if not (module == "onnx" or module.startswith(("onnx.", "onnx_ir"))):
        return False
    import onnx  # noqa: PLC0415
    import onnx_ir  # noqa: PLC0415

    return isinstance(model, (onnx.ModelProto, onnx_ir.Model))
