"""The one registry of rewrites: which exist, in which order, under which keywords.

Every module under ``convify/core/rewrites/`` declares one built-in rewrite
as its ``SPEC``; they are registered when this module is first used, so a
built-in rewrite is a file there (and one implementation file per frontend).
Others are added with :func:`register`. Frontends answer *how* a rewrite
is applied (``convify.fx.rewrites.implementation``); this module only
answers *which* rewrites there are.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Iterable

from convify.core import rewrites as _builtin
from convify.core.spec import RewriteSpec
from convify.errors import UsageError

#: Keywords of ``convify.convify`` that belong to the entry point, not to a rewrite.
ENGINE_KEYWORDS = frozenset({"model", "example_input", "only", "skip", "calibration", "inplace"})

REGISTRY: dict[str, RewriteSpec] = {}


def _load_builtin() -> None:
    for info in pkgutil.iter_modules(_builtin.__path__):
        spec = importlib.import_module(f"{_builtin.__name__}.{info.name}").SPEC
        if spec.name not in REGISTRY:
            register(spec)


def register(spec: RewriteSpec) -> RewriteSpec:
    """Make a rewrite known by its name, and its options keywords of
    ``convify.convify`` (which must not clash with another rewrite's)."""
    if spec.name in REGISTRY and REGISTRY[spec.name] is not spec:
        raise UsageError(f"two rewrites are named {spec.name!r}: {REGISTRY[spec.name]} and {spec}")
    taken = {k: name for name, other in REGISTRY.items() if other is not spec for k in other.keywords()}
    for key in spec.keywords():
        if key in ENGINE_KEYWORDS or key in taken:
            owner = taken.get(key, "the engine")
            raise UsageError(f"rewrite {spec.name!r}: keyword {key!r} is already taken by {owner}; rename the "
                             "option (convify.convify, the command line and recipes need unique names)")
    REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Forget a rewrite added with :func:`register` (tests declare toys)."""
    REGISTRY.pop(name, None)


def get(name: str) -> RewriteSpec:
    """The rewrite named ``name``; a :class:`~convify.errors.UsageError` names the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise UsageError(f"no rewrite named {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


def in_order() -> list[RewriteSpec]:
    """The registered rewrites in the order ``convify.convify`` applies them."""
    return sorted(REGISTRY.values(), key=lambda spec: spec.order)


def all_keywords() -> list[str]:
    return [k for spec in in_order() for k in spec.keywords()]


def unknown_keywords(given: Iterable[str]) -> list[str]:
    known = set(all_keywords())
    return sorted(k for k in given if k not in known)


_load_builtin()
