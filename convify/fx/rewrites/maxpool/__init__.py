"""Max pooling becomes a strided convolution (Springenberg et al., 2014), or
whatever else a pooling mode makes of it.

Sites: ``nn.MaxPool1d/2d/3d`` calls and the functional ``F.max_pool{1,2,3}d``
and ``torch.max_pool{1,2,3}d`` calls, matched by identity, and timm's
``MaxPool2dSame`` (a "same" pooling: :class:`~.same.PadSame` before the new
convolution). This file finds the sites and reads their :class:`PoolParams`;
what a site becomes is its pooling mode's, one file each in this package,
registered with :func:`~.modes.pool_mode`:

* :mod:`.conv`: ``ConvNd(C, C, k, stride=s, padding=p, dilation=d)``, the
  paper's learnable pooling;
* :mod:`.depthwise`: the same with ``groups=C``;
* :mod:`.fold`: the Strided-CNN variant: the pool is dropped and its stride
  moves onto the stride-1 convolution that produces its input;
* :mod:`.exact`: convolutions and ReLUs that compute the max pooling exactly
  (``max(a, b) = b + relu(a - b)``), its borders in :mod:`.padding`.

Adding a mode means adding a file here.

Generated code, before and after (``init="avg"``, ``ceil_mode=True``)::

    maxpool = self.maxpool(relu)                       # MaxPool2d(3, 2, 1, ceil_mode=True)
    pad = torch.nn.functional.pad(relu, (0, 1, 0, 1))  # the ceil_mode windows, made explicit
    maxpool = self.maxpool(pad)                        # Conv2d(64, 64, 3, stride=2, padding=1)

and for timm's ``MaxPool2dSame(3, 2)``::

    pool = self.pool(conv)                             # pads "same" with -inf, then pools
    pool_pad = self.pool_pad(conv)                     # PadSame(kernel=(3, 3), stride=(2, 2)): zeros
    pool = self.pool(pool_pad)                         # Conv2d(64, 64, 3, stride=2)
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable, Sequence

import torch.fx as fx
import torch.nn as nn

from convify.core.report import Replaced
from convify.core.rewrites.maxpool import SPEC, MaxPoolOptions, PoolParams
from convify.fx import nodes, ops, shapes
from convify.fx.rewrites import implements
from convify.fx.rewrites.base import Rewrite, Site
from convify.fx.rewrites.maxpool.modes import FxPoolMode, fx_pool_mode, is_getitem
from convify.fx.rewrites.maxpool.same import PadSame, same_pool_mismatch

_ARG_NAMES = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")

__all__ = ["PadSame", "ReplaceMaxPool"]


def _call_arguments(node: fx.Node) -> dict[str, Any]:
    bound = dict(zip(_ARG_NAMES, node.args))
    bound.update(node.kwargs)
    return bound


def _forward_is_stock(module: nn.Module) -> bool:
    return type(module).forward in tuple(cls.forward for cls in ops.MAX_POOL_MODULES)


def _module_dims(module: nn.Module) -> int | None:
    for cls, dims in ops.MAX_POOL_MODULES.items():
        if isinstance(module, cls):
            return dims
    return None


@implements(SPEC)
class ReplaceMaxPool(Rewrite[PoolParams]):
    """Max pooling becomes what its mode makes of it; see :class:`MaxPoolOptions`."""

    leaf_modules = ops.MAX_POOLING_MODULES
    options: MaxPoolOptions

    def __init__(self, options: MaxPoolOptions | None = None, **values: Any) -> None:
        super().__init__(options, **values)
        self.mode: FxPoolMode = fx_pool_mode(self.options.mode)

    # ------------------------------------------------------------------ finding

    def is_site_function(self, func: Callable) -> bool:
        return func in ops.MAX_POOLING_CALLS

    def describe_function(self, func: Callable) -> str:
        spec = ops.MAX_POOL_FUNCTIONS.get(func)
        return spec.name if spec is not None else ops.ADAPTIVE_MAX_POOL_FUNCTIONS.get(func, repr(func))

    def find_sites(self, gm: fx.GraphModule) -> list[Site[PoolParams]]:
        sites: list[Site[PoolParams]] = []
        name_for = nodes.CallNames()
        for node in gm.graph.nodes:
            if node.op == "call_module":
                module = gm.get_submodule(node.target)
                if self.is_site_module(module):
                    sites.append(self._module_site(node, module, name_for(node.target)))
            elif node.op == "call_function" and self.is_site_function(node.target):
                base = nodes.join(nodes.scope_of(node), self.describe_function(node.target))
                sites.append(self._function_site(node, name_for(base)))
        for site in sites:
            site.skip_reason = (site.skip_reason or self._shape_reason(site) or self._indices_reason(site)
                                or self.mode.skip_reason(gm, site, self.options))
        return sites

    def _module_site(self, node: fx.Node, module: nn.Module, name: str) -> Site[PoolParams]:
        cls = type(module).__name__
        dims = _module_dims(module)
        if dims is None:
            return Site(name, node, cls, skip_reason=(
                "adaptive max pooling: its windows depend on the input size; convify replaces "
                "fixed-window max pooling only"))
        if not _forward_is_stock(module):
            return self._same_site(node, module, name)
        params = PoolParams.of(dims, module.kernel_size, module.stride, module.padding, module.dilation,
                         module.ceil_mode, module.return_indices)
        return Site(name, node, params.describe(cls), params=params)

    def _same_site(self, node: fx.Node, module: nn.Module, name: str) -> Site[PoolParams]:
        """A MaxPool subclass with its own forward: a site only when it is a
        known "same" max pooling (timm's ``MaxPool2dSame``) that behaves as one."""
        cls = type(module).__name__
        dims = ops.same_max_pool_dims(module)
        if dims is None:
            return Site(name, node, cls, skip_reason=(
                f"{cls} subclasses MaxPool{_module_dims(module)}d with its own forward (it may pad or transform "
                "before pooling); a strided convolution would not compute the same borders (of such "
                "subclasses convify replaces timm's MaxPool2dSame only)"))
        # its forward ignores its padding and return_indices: pad_same, then F.max_pool2d(x, k, s, 0, d, ceil_mode)
        params = PoolParams.of(dims, module.kernel_size, module.stride, 0, module.dilation, module.ceil_mode, False,
                         same=True)
        return Site(name, node, params.describe(cls), params=params, skip_reason=same_pool_mismatch(module, params))

    def _function_site(self, node: fx.Node, name: str) -> Site[PoolParams]:
        op = self.describe_function(node.target)
        if node.target in ops.ADAPTIVE_MAX_POOL_FUNCTIONS:
            return Site(name, node, op, skip_reason=(
                "adaptive max pooling: its windows depend on the input size; convify replaces "
                "fixed-window max pooling only"))
        spec = ops.MAX_POOL_FUNCTIONS[node.target]
        dims, with_indices = spec.dims, spec.returns_indices
        args = _call_arguments(node)
        dynamic = [k for k, v in args.items() if k != "input" and isinstance(v, fx.Node)]
        if dynamic:
            return Site(name, node, op, skip_reason=(
                f"its {', '.join(dynamic)} is computed at run time; a convolution needs a fixed window"))
        params = PoolParams.of(dims, args.get("kernel_size"), args.get("stride"), args.get("padding", 0),
                         args.get("dilation", 1), args.get("ceil_mode", False),
                         with_indices or args.get("return_indices", False))
        return Site(name, node, params.describe(f"F.{op}"), params=params)

    def _shape_reason(self, site: Site) -> str | None:
        if site.params is None:
            return None
        inp = shapes.input_info(site.node)
        if inp is None:
            return "no shape was recorded for its input (it did not run on the example input)"
        if len(inp.shape) != site.params.dims + 2:
            return (f"input of shape {tuple(inp.shape)} has no batch dimension; convify needs "
                    f"(N, C, {'x'.join('*' * site.params.dims)}) to build a convolution")
        if not inp.dtype.is_floating_point:
            return f"input is {inp.dtype}; a convolution needs floating point"
        return None

    def _indices_reason(self, site: Site) -> str | None:
        if site.params is None or not site.params.return_indices:
            return None
        users = list(site.node.users)
        if all(is_getitem(u, 0) or (u.op == "call_function" and not u.users) for u in users):
            return None  # only the values are used: replaceable
        return ("return_indices=True and its indices are used (max unpooling, argmax); "
                "a convolution has no indices")

    # ------------------------------------------------------------------ applying

    def apply(self, gm: fx.GraphModule, site: Site[PoolParams]) -> Replaced:
        return self.mode.apply(gm, site, self.options)

    def finish(self, gm: fx.GraphModule, rows: Sequence[Replaced]) -> list[str]:
        notes = self.mode.finish(rows, self.options)
        return notes + [NOT_EXACT] if any(not r.exact for r in rows) else notes


#: The pass note of a rewrite that changed what the model computes: what to do about it.
NOT_EXACT = ("not exact: these sites no longer compute a max pooling, so a trained model's outputs change; "
             "mode='exact' keeps its function with convolutions and ReLUs and needs no data; to recover accuracy "
             "instead: init='fit' with calibration images, then convify.reconstruct and convify.distill")


for _info in pkgutil.iter_modules(__path__):  # every mode file registers itself
    importlib.import_module(f"{__name__}.{_info.name}")
