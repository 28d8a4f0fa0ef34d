"""A pooling mode in the torch.fx frontend: the base class, its registry, and
the graph surgery every mode shares.

A mode is a :class:`FxPoolMode` subclass in its own file of this package,
registered with :func:`pool_mode`, which also registers its core
declaration (:class:`~convify.core.rewrites.maxpool.PoolMode`): from then on
``replace_maxpool(mode=NAME)``, ``convify(pool=NAME)``, ``--pool NAME``,
recipes and ``verify``'s census take it. A mode's :meth:`~FxPoolMode.apply`
rewrites one site and returns its row, whose ``detail`` is a
:class:`~convify.core.rewrites.maxpool.PoolRecord`.
"""
from __future__ import annotations

import abc
import operator
from typing import Callable, ClassVar, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from convify.core.report import Replaced
from convify.core.rewrites.maxpool import MaxPoolOptions, PoolMode, PoolParams, register_pool_mode, unregister_pool_mode
from convify.errors import UsageError
from convify.fx import nodes, shapes
from convify.fx.rewrites.base import Site


class FxPoolMode(abc.ABC):
    """What one pooling mode makes of a max pooling site in a GraphModule."""

    mode: ClassVar[PoolMode]

    def skip_reason(self, gm: fx.GraphModule, site: Site[PoolParams], options: MaxPoolOptions) -> str | None:
        """Why this mode must leave a site alone (it cannot build it as the
        mode promises), or None. Asked once per site, before any is applied."""
        return None

    @abc.abstractmethod
    def apply(self, gm: fx.GraphModule, site: Site[PoolParams], options: MaxPoolOptions) -> Replaced:
        """Rewrite one site in place (its ``params`` are set and it is not
        skipped); names in the returned row are local to ``gm``."""

    def finish(self, rows: Sequence[Replaced], options: MaxPoolOptions | None = None) -> list[str]:
        """Notes for the pass once every site of a graph is applied."""
        return []


#: The torch.fx implementation of each pooling mode, by name.
FX_POOL_MODES: dict[str, FxPoolMode] = {}


def pool_mode(mode: PoolMode) -> Callable[[type[FxPoolMode]], type[FxPoolMode]]:
    """Class decorator: register a pooling mode, in the core and here."""

    def register(cls: type[FxPoolMode]) -> type[FxPoolMode]:
        register_pool_mode(mode)
        cls.mode = mode
        FX_POOL_MODES[mode.name] = cls()
        return cls

    return register


def fx_pool_mode(name: str) -> FxPoolMode:
    """The torch.fx implementation of pooling mode ``name``."""
    try:
        return FX_POOL_MODES[name]
    except KeyError:
        raise UsageError(f"pooling mode {name!r} has no torch.fx implementation; implemented: "
                         f"{', '.join(FX_POOL_MODES)}") from None


def forget_pool_mode(name: str) -> None:
    """Unregister a pooling mode, in the core and here (tests declare toys)."""
    FX_POOL_MODES.pop(name, None)
    unregister_pool_mode(name)


# --------------------------------------------------------------------------- shared surgery


def is_getitem(node: fx.Node, index: int) -> bool:
    return node.op == "call_function" and node.target is operator.getitem and node.args[1] == index


def site_input(node: fx.Node) -> fx.Node:
    """The node whose tensor the pooling reads."""
    return node.args[0] if node.args else node.kwargs["input"]


def site_shapes(site: Site[PoolParams]) -> tuple[shapes.TensorInfo, shapes.TensorInfo | None]:
    """The recorded input and (values) output of a site."""
    node = site.node
    out = shapes.info(node)
    if out is None and site.params is not None and site.params.return_indices:
        out = shapes.info(next(u for u in node.users if is_getitem(u, 0)))
    return shapes.input_info(node), out


def new_module_target(gm: fx.GraphModule, site: Site[PoolParams]) -> tuple[str, bool]:
    """Where the site's new module goes (the pooling's own name for a module
    call, a free name after the site for a functional one) and the training
    flag it takes."""
    node = site.node
    if node.op == "call_module":
        return node.target, gm.get_submodule(node.target).training
    return nodes.free_name(gm, site.name), gm.training


def swap_in(gm: fx.GraphModule, site: Site[PoolParams], new: fx.Node) -> None:
    """Point the pooling's users at ``new`` (its values, when the pooling
    also returned indices nobody used) and erase the pooling."""
    node, graph = site.node, gm.graph
    new.meta = dict(node.meta)
    if site.params is not None and site.params.return_indices:  # only the values are used (checked when found)
        for user in list(node.users):
            if is_getitem(user, 0):
                user.replace_all_uses_with(new)
            graph.erase_node(user)
    else:
        node.replace_all_uses_with(new)
    graph.erase_node(node)


def device_at(gm: fx.GraphModule, node: fx.Node, inp: shapes.TensorInfo) -> torch.device:
    """Where a new module at ``node`` must live: with the nearest module
    upstream that holds floating-point tensors, else with the model.

    Not the recorded device: shapes are propagated on meta tensors, which
    record every node on the example input's device. The dtype is the one
    recorded for the site's input: what arrives there, which the example
    input check (:func:`convify.fx.inputs.as_args`) keeps in the model's dtype.
    """
    seen: set[fx.Node] = set()
    frontier = list(node.all_input_nodes)
    while frontier and len(seen) < 64:  # a few hops find it; a pathological graph falls back to the model
        cur = frontier.pop(0)
        if cur in seen:
            continue
        seen.add(cur)
        if cur.op == "call_module":
            found = _first_float(gm.get_submodule(cur.target))
            if found is not None:
                return found.device
        frontier.extend(cur.all_input_nodes)
    found = _first_float(gm)
    return found.device if found is not None else inp.device


def _first_float(module: nn.Module) -> torch.Tensor | None:
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point():
            return t
    return None
