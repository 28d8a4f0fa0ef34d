"""One file per rewrite. Importing this package registers every rewrite in it:
adding a rewrite means adding a file here, not editing a dispatcher."""
from __future__ import annotations

import importlib
import pkgutil

from ..errors import UsageError
from .base import REGISTRY, Rewrite, Site, register

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")


def get(name: str) -> type[Rewrite]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UsageError(f"no rewrite named {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


__all__ = ["REGISTRY", "Rewrite", "Site", "get", "register"]
