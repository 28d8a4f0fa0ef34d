"""The ONNX implementations of the core's rewrites, one file (or package)
each. Importing this package imports every one of them, and each marks
itself with :func:`implements`, as in :mod:`convify.fx.rewrites`: adding a
rewrite to the ONNX frontend means adding its file here, not editing a
dispatcher.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable

from convify.core import registry
from convify.core.spec import RewriteSpec
from convify.errors import UsageError
from convify.onnx.rewrites.base import OnnxRewrite, Site

#: The ONNX implementation of each rewrite, by the rewrite's name.
IMPLEMENTATIONS: dict[str, type[OnnxRewrite]] = {}


def implements(spec: RewriteSpec) -> Callable[[type[OnnxRewrite]], type[OnnxRewrite]]:
    """Class decorator: ``cls`` is this frontend's implementation of ``spec``
    (registered in the core's registry too, if it is not yet)."""

    def mark(cls: type[OnnxRewrite]) -> type[OnnxRewrite]:
        registry.register(spec)
        cls.spec = spec
        IMPLEMENTATIONS[spec.name] = cls
        return cls

    return mark


def implementation(name: str) -> type[OnnxRewrite]:
    """The ONNX implementation of the rewrite named ``name``; a
    :class:`~convify.errors.UsageError` names those there are."""
    spec = registry.get(name)
    try:
        return IMPLEMENTATIONS[spec.name]
    except KeyError:
        raise UsageError(f"rewrite {name!r} has no ONNX implementation yet; implemented for ONNX: "
                         f"{', '.join(sorted(IMPLEMENTATIONS))}") from None


def forget(name: str) -> None:
    """Remove a rewrite's ONNX implementation (tests declare toys); the
    core's registry keeps its spec, which another frontend may implement."""
    IMPLEMENTATIONS.pop(name, None)


for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["IMPLEMENTATIONS", "OnnxRewrite", "Site", "forget", "implementation", "implements"]
