"""What a rewrite implements in the torch.fx frontend.

A rewrite is declared once in the core (a :class:`~convify.core.spec.RewriteSpec`
under ``convify/core/rewrites/``); this frontend implements it as a
:class:`Rewrite` subclass in its own file under ``convify/fx/rewrites/``,
marked with :func:`~convify.fx.rewrites.implements`. The subclass declares
``leaf_modules`` (module classes the tracer keeps as one call: the sites),
finds its :class:`Site` s in a shape-propagated graph (each with a skip reason
when it must be left alone) and applies itself to one site at a time,
returning a :class:`~convify.core.report.Replaced` row whose ``detail`` is
the rewrite's typed record (a record that names modules implements
:class:`NamesModules`). The engine (:mod:`convify.fx.engine`) does the rest
for all of them: copying, tracing with a fallback for untraceable models,
``only``/``skip`` filtering, giving each call of a shared module its own name,
graph hygiene.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Generic, Protocol, Sequence, TypeVar, runtime_checkable

import torch.fx as fx
import torch.nn as nn

from convify.core.options import RewriteOptions
from convify.core.report import Replaced
from convify.core.spec import RewriteSpec

#: A rewrite's parameters of one site (``PoolParams`` for a max pooling, a ``HeadPlan`` for a head).
P = TypeVar("P")


@dataclass
class Site(Generic[P]):
    """One place in a graph a rewrite looked at.

    ``name`` is the stable qualified name users match with ``only``/``skip``:
    the module path for a module call (``pool``, then ``pool@1`` for its second
    call), or the calling module's path plus the function name for a
    functional call (``features.max_pool2d``). ``params``: what the rewrite
    found there (None for a site it skips before reading any).
    """

    name: str
    node: fx.Node
    op: str
    skip_reason: str | None = None
    params: P | None = None


@runtime_checkable
class NamesModules(Protocol):
    """A site record (``Replaced.detail``) that names modules of the graph it
    was made in. The engine qualifies those names with the path of the
    submodule whose graph it was (as it does ``Replaced.name`` and
    ``module``), so that the record names modules of the whole model."""

    def with_prefix(self, prefix: str) -> Any: ...


class Rewrite(abc.ABC, Generic[P]):
    """Base of the torch.fx implementations of the core's rewrites; see the
    module docstring. Subclasses implement :meth:`find_sites` and :meth:`apply`."""

    spec: ClassVar[RewriteSpec]
    leaf_modules: ClassVar[tuple[type[nn.Module], ...]] = ()

    def __init__(self, options: RewriteOptions | None = None, **values: Any) -> None:
        self.options = self.spec.checked_options(options, values)

    @property
    def name(self) -> str:
        return self.spec.name

    # ---------------------------------------------------------------- finding and applying

    @abc.abstractmethod
    def find_sites(self, gm: fx.GraphModule) -> list[Site[P]]:
        """Every site in ``gm`` (shapes in ``node.meta``), in graph order."""

    @abc.abstractmethod
    def apply(self, gm: fx.GraphModule, site: Site[P]) -> Replaced:
        """Rewrite one site in place; names in the returned row are local to ``gm``."""

    def is_site_module(self, module: nn.Module) -> bool:
        """True for modules that are a site by themselves (the fallback wraps
        them when an untraceable parent calls them directly)."""
        return bool(self.leaf_modules) and isinstance(module, self.leaf_modules)

    def is_site_function(self, func: Callable) -> bool:
        """True for functions that would be sites; used to report such calls
        made from code torch.fx could not trace."""
        return False

    def describe_function(self, func: Callable) -> str:
        return getattr(func, "__name__", repr(func))

    def nothing_found(self, model: nn.Module) -> str:
        """The report note when ``model`` has no site at all."""
        return f"no {self.name} site found in the forward: nothing to rewrite"

    def finish(self, gm: fx.GraphModule, rows: Sequence[Replaced]) -> list[str]:
        """Called once after all sites of ``gm`` were applied (``rows``: what
        they became); returns notes for the pass."""
        return []
