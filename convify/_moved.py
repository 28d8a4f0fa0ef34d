"""Old module paths that whole pickled models still name.

``torch.save(model)`` pickles classes by module path: a GraphModule names
its tracer (``convify.graph.ConvifyTracer``), a rewritten model holds
``convify.rewrites.maxpool.PadSame`` or ``convify.head_matmul.MatmulConv2d``,
and its report names the record types. Those modules moved after 0.2.0; this
finder answers their old paths with small alias modules that look each name
up where it lives now, so a pickle written by 0.2.0 still loads. Nothing in
convify imports an old path; only unpickling does.

One table, old module -> the modules its names now live in (searched in order).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any, Sequence

MOVED: dict[str, tuple[str, ...]] = {
    "convify.graph": ("convify.fx.tracing", "convify.fx.example_call", "convify.fx.shapes", "convify.fx.nodes",
                      "convify.fx.copying"),
    "convify.head_matmul": ("convify.dense.matmul",),
    "convify.rewrites": ("convify.fx.rewrites",),
    "convify.rewrites.maxpool": ("convify.core.rewrites.maxpool", "convify.fx.rewrites.maxpool.same"),
    "convify.rewrites.head": ("convify.core.rewrites.head", "convify.fx.rewrites.head"),
    "convify.rewrites.head.plan": ("convify.core.rewrites.head", "convify.fx.rewrites.head.plan"),
    "convify.rewrites.head.exactness": ("convify.core.rewrites.head", "convify.fx.rewrites.head.exactness"),
    "convify.geometry": ("convify.dense.geometry",),
    "convify.weights": ("convify.core.weights",),
}

#: Old paths that are packages (they have submodules above).
_PACKAGES = frozenset({"convify.rewrites", "convify.rewrites.head"})


def _alias_module(name: str, homes: Sequence[str]) -> types.ModuleType:
    module = types.ModuleType(name, f"Moved: the names of {name} now live in {', '.join(homes)}.")

    def __getattr__(attr: str) -> Any:
        for home in homes:
            found = importlib.import_module(home)
            if hasattr(found, attr):
                return getattr(found, attr)
        raise AttributeError(f"module {name!r} (moved to {', '.join(homes)}) has no attribute {attr!r}")

    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    if name in _PACKAGES:
        module.__path__ = []  # so that the old submodules can be imported under it
    return module


class _Loader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _alias_module(spec.name, MOVED[spec.name])

    def exec_module(self, module: types.ModuleType) -> None:
        return None


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Loader(), is_package=fullname in _PACKAGES)


def install() -> None:
    """Answer the old paths (once; ``import convify`` calls this). The report
    module keeps its old name as a plain entry: ``convify.report`` is the
    public function, and a submodule import would overwrite it."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
    from convify.core import report  # noqa: PLC0415  (light: no torch)

    sys.modules.setdefault("convify.report", report)
