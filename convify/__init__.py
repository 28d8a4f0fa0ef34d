"""convify: rewrite PyTorch CNNs into all-convolutional networks.

Max pooling becomes strided convolution (Springenberg et al., 2014, "Striving
for Simplicity"); Linear heads become exact convolutions or global-average
heads, so a classifier becomes fully convolutional.

>>> import convify, torchvision
>>> model = torchvision.models.vgg11().eval()
>>> allconv = convify.replace_maxpool(model)
>>> print(convify.report(allconv))
"""
from __future__ import annotations

import importlib
from typing import Any

from convify import _moved
from convify.core.report import Report
from convify.errors import ConvifyError

_moved.install()  # 0.2.0 pickles name modules that moved

__version__ = "0.2.0"

# Heavy or optional parts (onnx, onnxruntime, training) load on first use, so
# that `import convify` and `convify --help` stay fast.
_LAZY = {
    "replace_maxpool": "convify.api",
    "report": "convify.api",
    "replace_linear_head": "convify.api",
    "convify": "convify.api",
    "export_onnx": "convify.export.onnx",
    "verify": "convify.export.verify",
    "Verification": "convify.export.verify",
    "load": "convify.io",
    "save": "convify.io",
    "distill": "convify.recovery.distillation",
    "History": "convify.recovery.distillation",
    "matmul_heads": "convify.dense.matmul",
    "dense_map": "convify.dense",
    "receptive_field": "convify.dense.geometry",
    "reconstruct": "convify.recovery.reconstruction",
}

__all__ = [
    "replace_maxpool", "replace_linear_head", "convify", "report", "export_onnx", "verify", "load",
    "distill", "Report", "Verification", "History", "ConvifyError", "save", "matmul_heads", "dense_map",
    "receptive_field", "reconstruct", "__version__",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'convify' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
