"""What ``convify demo`` prints of a verification: the export it kept, then the verification table."""
from __future__ import annotations

import os
from typing import Any, Callable

import torch.nn as nn

from convify.export.verify import Verification, verify


def demo_verify(original: nn.Module, rewritten: nn.Module, example_input: Any = None, *,
                path: str | os.PathLike | None = None, provider: str = "cpu", exporter: str = "dynamo",
                min_agreement: float | None = None, echo: Callable[[str], Any] = print,
                temporary: bool = False) -> Verification:
    """What ``convify demo`` shows: export ``rewritten`` (to ``path`` when given),
    verify it in onnxruntime, and print the verification table. ``temporary``:
    ``path`` lies in a folder removed afterwards, so only its name is shown, and why.

    >>> demo_verify(model, convify.replace_maxpool(model), torch.randn(1, 3, 224, 224), path="allconv.onnx")
    """
    result = verify(original, rewritten, example_input, provider=provider, exporter=exporter, onnx_path=path,
                    min_agreement=min_agreement)
    if result.onnx_path is not None:
        size = result.onnx_path.stat().st_size / 2**20
        where = (f"{result.onnx_path.name}, in a temporary folder removed when the demo ends (`convify rewrite "
                 "MODEL -o OUT.pt --onnx OUT.onnx` writes one to keep)" if temporary else str(result.onnx_path))
        echo(f"exported {where} ({size:.1f} MiB, {result.exporter} exporter, weights embedded)")
    echo(str(result))
    return result
