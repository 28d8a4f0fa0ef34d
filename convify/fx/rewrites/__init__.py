"""The torch.fx implementations of the core's rewrites, one file (or
package) each. Importing this package imports every one of them, and each
marks itself with :func:`implements`: adding a rewrite means adding its spec
under ``convify/core/rewrites/`` and its implementation here, not editing a
dispatcher.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable

import torch.nn as nn

from convify.core import registry
from convify.core.spec import RewriteSpec
from convify.errors import UsageError
from convify.fx.rewrites.base import Rewrite, Site

#: The torch.fx implementation of each rewrite, by the rewrite's name.
IMPLEMENTATIONS: dict[str, type[Rewrite]] = {}


def implements(spec: RewriteSpec) -> Callable[[type[Rewrite]], type[Rewrite]]:
    """Class decorator: ``cls`` is this frontend's implementation of ``spec``
    (registered in the core's registry too, if it is not yet)."""

    def mark(cls: type[Rewrite]) -> type[Rewrite]:
        registry.register(spec)
        cls.spec = spec
        IMPLEMENTATIONS[spec.name] = cls
        return cls

    return mark


def implementation(name: str) -> type[Rewrite]:
    """The torch.fx implementation of the rewrite named ``name``."""
    spec = registry.get(name)
    try:
        return IMPLEMENTATIONS[spec.name]
    except KeyError:
        raise UsageError(f"rewrite {name!r} has no torch.fx implementation; implemented: "
                         f"{', '.join(sorted(IMPLEMENTATIONS))}") from None


def forget(name: str) -> None:
    """Remove a rewrite and its implementation (tests declare toys)."""
    IMPLEMENTATIONS.pop(name, None)
    registry.unregister(name)


def leaf_modules() -> tuple[type[nn.Module], ...]:
    """Every implemented rewrite's site modules: the tracer keeps them as one
    call in every pass, so a rewritten model retraces to the same graph."""
    found = (IMPLEMENTATIONS[s.name].leaf_modules for s in registry.in_order() if s.name in IMPLEMENTATIONS)
    return tuple(dict.fromkeys(m for modules in found for m in modules))


for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["IMPLEMENTATIONS", "Rewrite", "Site", "forget", "implementation", "implements", "leaf_modules"]
