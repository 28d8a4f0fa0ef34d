"""Node and submodule helpers: stable qualified names, setting submodules, site filters, graph hygiene."""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Sequence

import torch.fx as fx
import torch.nn as nn


def is_output_like(node: fx.Node) -> bool:
    """The graph's output, or a container built only for it: a tuple or
    namedtuple, or a dataclass (a ``ModelOutput``) made by calling its class."""
    if node.op == "output":
        return True
    if node.op == "call_function" and isinstance(node.target, type) and (
            issubclass(node.target, tuple) or dataclasses.is_dataclass(node.target)):
        return all(is_output_like(u) for u in node.users)
    return False


# --------------------------------------------------------------------------- names and modules


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def parent_name(target: str) -> tuple[str, str]:
    *parent, name = target.rsplit(".", 1)
    return (parent[0] if parent else ""), name


def set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    """Install ``module`` at dotted path ``target`` below ``root``, creating
    empty parent containers where the graph module has none."""
    parent_path, name = parent_name(target)
    parent = root
    for part in filter(None, parent_path.split(".")):
        child = getattr(parent, part, None)
        if not isinstance(child, nn.Module):
            child = nn.Module()
            parent.add_module(part, child)
        parent = child
    if name in parent._modules:
        parent._modules[name] = module
    else:
        parent.add_module(name, module)


def call_name(base: str, index: int) -> str:
    """The name of call ``index`` (from 0) of one module or function:
    ``pool``, ``pool@1``, ``pool@2``... (site names, module aliases)."""
    return base if index == 0 else f"{base}@{index}"


class CallNames:
    """Hands out :func:`call_name` s in call order: the first ``pool``, then ``pool@1``..."""

    def __init__(self) -> None:
        self._seen: dict[str, int] = {}

    def __call__(self, base: str) -> str:
        index = self._seen.get(base, 0)
        self._seen[base] = index + 1
        return call_name(base, index)


def free_name(root: nn.Module, wanted: str) -> str:
    """``wanted`` if no module or attribute lives there, else the first free ``wanted@k``."""
    k = 0
    while _taken(root, call_name(wanted, k)):
        k += 1
    return call_name(wanted, k)


def _taken(root: nn.Module, target: str) -> bool:
    obj: Any = root
    for part in target.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def scope_of(node: fx.Node) -> str:
    """Qualified name of the module whose forward made this call
    (from the tracer's ``nn_module_stack``; '' at the top level)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    last = list(stack.values())[-1]
    return last[0] if isinstance(last, tuple) else str(last)


def matches(name: str, patterns: Sequence[str] | None) -> str | None:
    """The first glob pattern that ``name`` matches, if any."""
    for pat in patterns or ():
        if fnmatch.fnmatchcase(name, pat):
            return pat
    return None


def as_patterns(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def finalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Graph hygiene after a rewrite: dead code, unused modules, lint, recompile."""
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm
