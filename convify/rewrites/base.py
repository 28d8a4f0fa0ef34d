"""The one mechanism every rewrite plugs into.

A rewrite is a :class:`Rewrite` subclass in its own file under
``convify/rewrites/``, registered with :func:`register`. It finds its
:class:`Site` s in a shape-propagated graph (each with a skip reason when it
must be left alone) and applies itself to one site at a time. The engine
(``convify.engine``) does the rest for all of them: copying, tracing with a
fallback for untraceable models, ``only``/``skip`` filtering, giving each call
of a shared module its own name, graph hygiene and the report.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch.fx as fx
import torch.nn as nn

from ..report import Replaced

REGISTRY: dict[str, type["Rewrite"]] = {}


def register(cls: type["Rewrite"]) -> type["Rewrite"]:
    """Class decorator: make a rewrite available by its ``name``."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"two rewrites are named {cls.name!r}: {REGISTRY[cls.name]} and {cls}")
    REGISTRY[cls.name] = cls
    return cls


@dataclass
class Site:
    """One place in a graph a rewrite looked at.

    ``name`` is the stable qualified name users match with ``only``/``skip``:
    the module path for a module call (``pool``, then ``pool@1`` for its second
    call), or the calling module's path plus the function name for a
    functional call (``features.max_pool2d``).
    """

    name: str
    node: fx.Node
    op: str
    skip_reason: str | None = None
    params: Any = None
    extra_nodes: list[fx.Node] = field(default_factory=list)


class Rewrite(abc.ABC):
    """Base class of the rewrites. Subclasses set ``name`` and implement
    :meth:`find_sites` and :meth:`apply`."""

    name: ClassVar[str]

    def __init__(self, **options: Any) -> None:
        self.options = options

    @abc.abstractmethod
    def find_sites(self, gm: fx.GraphModule) -> list[Site]:
        """Every site in ``gm`` (shapes in ``node.meta``), in graph order."""

    @abc.abstractmethod
    def apply(self, gm: fx.GraphModule, site: Site) -> Replaced:
        """Rewrite one site in place; names in the returned row are local to ``gm``."""

    def is_site_module(self, module: nn.Module) -> bool:
        """True for modules that are a site by themselves (the fallback wraps
        them when an untraceable parent calls them directly)."""
        return False

    def is_site_function(self, func: Callable) -> bool:
        """True for functions that would be sites; used to report such calls
        made from code torch.fx could not trace."""
        return False

    def describe_function(self, func: Callable) -> str:
        return getattr(func, "__name__", repr(func))

    def nothing_found(self, model: nn.Module) -> str:
        """The report note when ``model`` has no site at all."""
        return f"no {self.name} site found in the forward: nothing to rewrite"

    def finish(self, gm: fx.GraphModule) -> list[str]:
        """Called once after all sites of ``gm`` were applied; returns notes."""
        return []
