"""Max pooling becomes a strided convolution (Springenberg et al., 2014).

Sites: ``nn.MaxPool1d/2d/3d`` calls and the functional ``F.max_pool{1,2,3}d``
and ``torch.max_pool{1,2,3}d`` calls, matched by identity, and timm's
``MaxPool2dSame`` (a "same" pooling: :class:`PadSame` before the new
convolution). Modes:

* ``conv``: ``ConvNd(C, C, k, stride=s, padding=p, dilation=d)``, the paper's
  learnable pooling;
* ``depthwise``: the same with ``groups=C``;
* ``fold``: the Strided-CNN variant: the pool is dropped and its stride moves
  onto the stride-1 convolution that produces its input.

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

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .. import graph as G
from .. import ops
from .. import weights as W
from ..errors import OptionError, one_line
from ..report import Pass, Replaced
from .base import Rewrite, RewriteOptions, Site, option, register

_ARG_NAMES = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")

@dataclass(frozen=True)
class PoolParams:
    """The window of one max pooling, every field expanded to one value per dimension.

    ``same``: the pooling pads "same" at run time, with -inf, before pooling
    with no padding of its own (timm's ``MaxPool2dSame``): its padding depends
    on the input size (:func:`convify.weights.same_padding`) and its output
    length is ``ceil(size / stride)``; ``padding`` is then all zeros.
    """

    dims: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    ceil_mode: bool
    return_indices: bool
    same: bool = False

    def describe(self, op: str) -> str:
        parts = [f"k={_fmt(self.kernel)}", f"s={_fmt(self.stride)}"]
        if any(self.padding):
            parts.append(f"p={_fmt(self.padding)}")
        if any(d != 1 for d in self.dilation):
            parts.append(f"d={_fmt(self.dilation)}")
        if self.ceil_mode:
            parts.append("ceil_mode")
        if self.same:
            parts.append("same")
        return f"{op}({', '.join(parts)})"

    @property
    def extra_pad(self) -> tuple[int, ...]:
        """Right/bottom zeros that reproduce ceil_mode's output size (none for
        a "same" pooling: its padded input leaves no partial window)."""
        if not self.ceil_mode or self.same:
            return (0,) * self.dims
        return tuple(W.ceil_mode_extra_pad(k, s, p, d) for k, s, p, d in
                     zip(self.kernel, self.stride, self.padding, self.dilation))

    def same_pad(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """``F.pad``'s argument (last dimension first) for the "same" padding
        of an input of this spatial size."""
        pairs = [W.same_padding(n, k, s, d) for n, k, s, d in zip(spatial, self.kernel, self.stride, self.dilation)]
        return tuple(v for pair in reversed(pairs) for v in pair)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The max pooling these parameters describe, applied to ``x`` (its
        input in the original model), values only."""
        if self.same:
            x = F.pad(x, self.same_pad(x.shape[2:]), value=-float("inf"))
        return ops.MAX_POOL_BY_DIMS[self.dims](x, self.kernel, self.stride, self.padding, self.dilation,
                                               self.ceil_mode)


class PadSame(nn.Module):
    """Pads its input "same" for a window (``kernel``, ``stride``,
    ``dilation``) with zeros, the padding computed at run time from the input's size:
    ``max((ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)`` per dimension, the
    odd one on the right/bottom, as timm's ``pad_same`` does. Followed by a
    convolution with no padding of its own and this window, the output length
    is ``ceil(n / s)`` at every input size.

    ``replace_maxpool`` puts one before the convolution that replaces a
    "same" max pooling (timm's ``MaxPool2dSame``): zeros where the pooling
    padded with -inf. It has no parameters; torch.fx keeps it as one call and
    it exports to ONNX with dynamic height and width.

    >>> PadSame((3, 3), (2, 2))(torch.zeros(1, 1, 8, 7)).shape   # 8: pad 0+1, 7: pad 1+1
    torch.Size([1, 1, 9, 9])
    """

    convify_leaf = True  # a rewritten model retraces to the same graph

    def __init__(self, kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int] | None = None) -> None:
        super().__init__()
        self.kernel = tuple(kernel)
        self.stride = tuple(stride)
        self.dilation = tuple(dilation) if dilation is not None else (1,) * len(self.kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad: list = []
        spatial = x.shape[2:]
        for i in reversed(range(len(self.kernel))):  # F.pad takes the last dimension first
            total = W.same_pad_total(spatial[i], self.kernel[i], self.stride[i], self.dilation[i])
            pad += [total // 2, total - total // 2]
        return F.pad(x, pad)

    def extra_repr(self) -> str:
        text = f"kernel={self.kernel}, stride={self.stride}"
        return text + (f", dilation={self.dilation}" if any(d != 1 for d in self.dilation) else "")


def _fmt(values: tuple[int, ...]) -> str:
    return str(values[0]) if len(set(values)) == 1 else "x".join(map(str, values))


class PoolOutcome(enum.Enum):
    """What a max pooling site became."""

    CONV = "conv"              # a dense ConvNd(C, C, k, stride)
    DEPTHWISE = "depthwise"    # the same with groups=C
    FOLD = "fold"              # dropped; its stride moved onto the producing convolution


@dataclass(frozen=True)
class PoolRecord:
    """The typed record of one replaced max pooling (``Replaced.detail``):
    its window, what it became, and why a requested fold fell back."""

    params: PoolParams
    outcome: PoolOutcome
    fold_blocker: str | None = None

    @property
    def is_conv(self) -> bool:
        """A new convolution with weights of its own (not a fold)."""
        return self.outcome is not PoolOutcome.FOLD


FOLD_CAVEAT = ("fold keeps the pool's output shape at the example input size and at sizes congruent to it "
               "modulo the network's stride; at other sizes folded shapes may differ (the paper's Strided-CNN "
               "is defined for one input size)")


@dataclass(frozen=True)
class MaxPoolOptions(RewriteOptions):
    """Options of :func:`convify.replace_maxpool`."""

    mode: str = option("conv", "max pooling becomes a dense strided conv, a depthwise one, or is folded into the "
                               "conv before it", choices=("conv", "depthwise", "fold"))
    init: str = option("avg", "weights of the new pooling convolutions: avg (average pooling), kaiming (fresh), "
                              "or fit (least squares against the max pooling on calibration images)",
                       choices=("avg", "kaiming", "fit"))

    def calibration_option(self) -> tuple[str, Any] | None:
        return ("init", "fit") if self.init == "fit" else None

    def for_rebuild(self) -> "MaxPoolOptions":
        # the same modules with the average init; the fitted weights are loaded into them
        return dataclasses.replace(self, init="avg") if self.init == "fit" else self


def _params(dims: int, kernel: Any, stride: Any, padding: Any, dilation: Any, ceil_mode: Any,
            return_indices: Any, same: bool = False) -> PoolParams:
    kernel = W.ntuple(kernel, dims)
    stride = kernel if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0) else W.ntuple(stride, dims)
    return PoolParams(dims, kernel, stride, W.ntuple(padding, dims), W.ntuple(dilation, dims),
                      bool(ceil_mode), bool(return_indices), same)


def _same_pool_mismatch(module: nn.Module, params: PoolParams) -> str | None:
    """Why ``module`` does not compute what ``params`` describe, or None.

    Its class and forward were matched by identity; this checks the
    behaviour too (a timm release that pads differently would fail here):
    the module and :meth:`PoolParams.pool` on small random inputs, at a length
    of every residue modulo the stride in each dimension, including lengths
    shorter than the window.
    """
    g = torch.Generator().manual_seed(0)
    span = [d * (k - 1) + 1 for k, d in zip(params.kernel, params.dilation)]
    for extra in range(max(span) + max(params.stride)):
        size = tuple(1 + (extra + i) % (sp + s) for i, (sp, s) in enumerate(zip(span, params.stride)))
        x = torch.randn(1, 2, *size, generator=g)
        try:
            with torch.no_grad():
                got, want = module(x), params.pool(x)
        except Exception as e:  # noqa: BLE001  (any failure: not the pooling convify knows)
            return f"{type(module).__name__} did not run as a 'same' max pooling on a {size} input ({one_line(e)})"
        if not isinstance(got, torch.Tensor) or got.shape != want.shape or not torch.equal(got, want):
            return (f"{type(module).__name__} does not compute timm's 'same' max pooling (-inf padding, then "
                    f"max pooling with no padding) on a {size} input; convify cannot tell which borders it uses")
    return None


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


@register
class ReplaceMaxPool(Rewrite):
    """Max pooling becomes a strided convolution; see :class:`MaxPoolOptions`."""

    name = "maxpool"
    Options = MaxPoolOptions
    keyword = "pool"
    summary = "max pooling becomes strided convolution"
    order = 10
    leaf_modules = ops.MAX_POOLING_MODULES
    onnx_ops = ("MaxPool",)
    options: MaxPoolOptions

    #: ``fit_target``: what ``init="fit"`` fits each site toward.
    FIT_TARGETS = ("original", "pool")

    def __init__(self, options: MaxPoolOptions | None = None, *, fit_target: str = "original",
                 **values: Any) -> None:
        super().__init__(options, **values)
        if fit_target not in self.FIT_TARGETS:
            raise OptionError(f"maxpool: fit_target must be one of {self.FIT_TARGETS}, not {fit_target!r}")
        self.fit_target = fit_target

    # ------------------------------------------------------------------ finding

    def is_site_function(self, func: Callable) -> bool:
        return func in ops.MAX_POOLING_CALLS

    def describe_function(self, func: Callable) -> str:
        spec = ops.MAX_POOL_FUNCTIONS.get(func)
        return spec.name if spec is not None else ops.ADAPTIVE_MAX_POOL_FUNCTIONS.get(func, repr(func))

    def find_sites(self, gm: fx.GraphModule) -> list[Site]:
        sites: list[Site] = []
        name_for = G.CallNames()
        for node in gm.graph.nodes:
            if node.op == "call_module":
                module = gm.get_submodule(node.target)
                if self.is_site_module(module):
                    sites.append(self._module_site(node, module, name_for(node.target)))
            elif node.op == "call_function" and self.is_site_function(node.target):
                base = G.join(G.scope_of(node), self.describe_function(node.target))
                sites.append(self._function_site(node, name_for(base)))
        for site in sites:
            site.skip_reason = site.skip_reason or self._shape_reason(site) or self._indices_reason(site)
        return sites

    def _module_site(self, node: fx.Node, module: nn.Module, name: str) -> Site:
        cls = type(module).__name__
        dims = _module_dims(module)
        if dims is None:
            return Site(name, node, cls, skip_reason=(
                "adaptive max pooling: its windows depend on the input size; convify replaces "
                "fixed-window max pooling only"))
        if not _forward_is_stock(module):
            return self._same_site(node, module, name)
        params = _params(dims, module.kernel_size, module.stride, module.padding, module.dilation,
                         module.ceil_mode, module.return_indices)
        return Site(name, node, params.describe(cls), params=params)

    def _same_site(self, node: fx.Node, module: nn.Module, name: str) -> Site:
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
        params = _params(dims, module.kernel_size, module.stride, 0, module.dilation, module.ceil_mode, False,
                         same=True)
        return Site(name, node, params.describe(cls), params=params, skip_reason=_same_pool_mismatch(module, params))

    def _function_site(self, node: fx.Node, name: str) -> Site:
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
        params = _params(dims, args.get("kernel_size"), args.get("stride"), args.get("padding", 0),
                         args.get("dilation", 1), args.get("ceil_mode", False),
                         with_indices or args.get("return_indices", False))
        return Site(name, node, params.describe(f"F.{op}"), params=params)

    def _shape_reason(self, site: Site) -> str | None:
        if site.params is None:
            return None
        inp = G.input_info(site.node)
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
        if all(_is_getitem(u, 0) or (u.op == "call_function" and not u.users) for u in users):
            return None  # only the values are used: replaceable
        return ("return_indices=True and its indices are used (max unpooling, argmax); "
                "a convolution has no indices")

    # ------------------------------------------------------------------ applying

    def apply(self, gm: fx.GraphModule, site: Site) -> Replaced:
        if self.options.mode == "fold":
            blocker = _fold_blocker(gm, site)
            if blocker is None:
                return _fold(gm, site)
            return self._to_conv(gm, site, PoolOutcome.CONV, fold_blocker=blocker)
        return self._to_conv(gm, site, PoolOutcome(self.options.mode))

    def finish(self, gm: fx.GraphModule, rows: Sequence[Replaced]) -> list[str]:
        if any(r.detail.outcome is PoolOutcome.FOLD for r in rows):
            return [FOLD_CAVEAT]
        return []

    def calibrate(self, teacher: nn.Module | None, model: nn.Module, done: Pass,
                  calibration: Sequence[Any]) -> Pass:
        from ..fit import fit_pool_sites  # noqa: PLC0415  (least squares: only with calibration data)

        return fit_pool_sites(teacher, model, done, calibration, target=self.fit_target)

    def _to_conv(self, gm: fx.GraphModule, site: Site, outcome: PoolOutcome,
                 fold_blocker: str | None = None) -> Replaced:
        params: PoolParams = site.params
        node = site.node
        inp_node = node.args[0] if node.args else node.kwargs["input"]
        inp, out = G.input_info(node), G.info(node) or (G.info(_values_node(node)) if params.return_indices else None)
        channels = inp.shape[1]
        depthwise = outcome is PoolOutcome.DEPTHWISE
        # skip_init: the constructor's own random init would be thrown away at once (it was a
        # third of replace_maxpool's time on googlenet, whose pools have up to 832 channels)
        conv = nn.utils.skip_init(ops.CONV_MODULES[params.dims], channels, channels, params.kernel, stride=params.stride,
                                  padding=params.padding, dilation=params.dilation,
                                  groups=channels if depthwise else 1, bias=True, device=_device_at(gm, node, inp),
                                  dtype=inp.dtype)
        self._initialize(conv, params, channels, depthwise)
        training = gm.get_submodule(node.target).training if node.op == "call_module" else gm.training
        target = node.target if node.op == "call_module" else G.free_name(gm, site.name)
        conv.train(training)
        G.set_submodule(gm, target, conv)

        graph = gm.graph
        with graph.inserting_before(node):
            source = inp_node
            if params.same:  # zeros where the pooling padded with -inf: the average then counts them
                pad_target = G.free_name(gm, f"{target}_pad")
                G.set_submodule(gm, pad_target, PadSame(params.kernel, params.stride, params.dilation).train(training))
                source = graph.call_module(pad_target, (source,))
                source.meta = {}
            extra = params.extra_pad
            if any(extra):
                pad = tuple(v for e in reversed(extra) for v in (0, e))
                source = graph.call_function(F.pad, (source, pad))
                source.meta = {}
            new = graph.call_module(target, (source,))
        new.meta = dict(node.meta)
        if params.return_indices:  # only the values are used (checked when the site was found)
            for user in list(node.users):
                if _is_getitem(user, 0):
                    user.replace_all_uses_with(new)
                graph.erase_node(user)
        else:
            node.replace_all_uses_with(new)
        graph.erase_node(node)
        new_desc = f"{type(conv).__name__}({channels}, {channels}, k={_fmt(params.kernel)}, s={_fmt(params.stride)}"
        if any(params.padding):
            new_desc += f", p={_fmt(params.padding)}"
        if any(d != 1 for d in params.dilation):
            new_desc += f", d={_fmt(params.dilation)}"
        if depthwise:
            new_desc += f", groups={channels}"
        if any(extra):
            new_desc += f", +pad {_fmt(extra)}"
        if params.same:
            new_desc += ", +pad same"
        new_desc += ")"
        notes = (f"fold not possible: {fold_blocker}; used mode='conv'",) if fold_blocker else ()
        return Replaced(self.name, site.name, site.op, new_desc, inp.shape, out.shape if out else None,
                        exact=False, module=target, notes=notes,
                        detail=PoolRecord(params, outcome, fold_blocker))

    def _initialize(self, conv: nn.Module, params: PoolParams, channels: int, depthwise: bool) -> None:
        with torch.no_grad():
            if self.options.init == "kaiming":
                nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="linear")
            else:  # "avg", and the starting point of "fit"; a new Parameter: no copy of a large weight
                conv.weight = nn.Parameter(W.average_weight(channels, params.kernel, depthwise=depthwise,
                                                            dtype=conv.weight.dtype, device=conv.weight.device))
            conv.bias.zero_()


def _device_at(gm: fx.GraphModule, node: fx.Node, inp: G.TensorInfo) -> torch.device:
    """Where a new module at ``node`` must live: with the nearest module
    upstream that holds floating-point tensors, else with the model.

    Not the recorded device: shapes are propagated on meta tensors, which
    record every node on the example input's device. The dtype is the one
    recorded for the site's input: what arrives there, which the example
    input check (:func:`convify.inputs.as_args`) keeps in the model's dtype.
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


def _is_getitem(node: fx.Node, index: int) -> bool:
    import operator
    return node.op == "call_function" and node.target is operator.getitem and node.args[1] == index


def _values_node(node: fx.Node) -> fx.Node:
    return next(u for u in node.users if _is_getitem(u, 0))


# ---------------------------------------------------------------------- fold


def _is_elementwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Ops that commute with taking every s-th position: elementwise and per channel."""
    return ops.elementwise_kind(gm, node) is not None or ops.is_per_channel(gm, node)


def _fold_chain(gm: fx.GraphModule, site: Site) -> tuple[fx.Node | None, str | None]:
    """The producing convolution node, or why there is none."""
    node = site.node
    cur = node.args[0] if node.args else node.kwargs.get("input")
    while isinstance(cur, fx.Node):
        if len(cur.users) != 1:
            return None, f"{cur.name!r} between the convolution and the pool is also used elsewhere"
        if cur.op == "call_module" and isinstance(gm.get_submodule(cur.target), nn.modules.conv._ConvNd):
            return cur, None
        if not _is_elementwise(gm, cur) or not cur.args or not isinstance(cur.args[0], fx.Node):
            return None, f"its input comes from {cur.format_node()}, not from a convolution through elementwise ops"
        cur = cur.args[0]
    return None, "its input is not produced by a convolution"


def _fold_blocker(gm: fx.GraphModule, site: Site) -> str | None:
    params: PoolParams = site.params
    if params.return_indices:
        return "it returns indices"
    producer, reason = _fold_chain(gm, site)
    if producer is None:
        return reason
    conv = gm.get_submodule(producer.target)
    if len(conv.kernel_size) != params.dims or isinstance(conv, nn.modules.conv._ConvTransposeNd):
        return f"{producer.target} is a {type(conv).__name__}"
    if any(s != 1 for s in conv.stride):
        return f"{producer.target} already has stride {conv.stride}"
    if isinstance(conv.padding, str):
        return f"{producer.target} uses padding={conv.padding!r}"
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and gm.get_submodule(n.target) is conv]
    if len(calls) > 1:
        return f"{producer.target} is called at {len(calls)} places; a stride would change them all"
    conv_in, pool_out = G.input_info(producer), G.info(site.node)
    if conv_in is None or pool_out is None:
        return "no shapes were recorded"
    folded = tuple(W.conv_output_size(size, k, s, p, d) for size, k, s, p, d in zip(
        conv_in.shape[2:], conv.kernel_size, params.stride, conv.padding, conv.dilation))
    if folded != tuple(pool_out.shape[2:]):
        return f"the strided convolution would give {folded} where the pool gives {tuple(pool_out.shape[2:])}"
    return None


def _now_pool_sized(producer: fx.Node, pool: fx.Node, out: G.TensorInfo | None) -> None:
    """After a fold, the convolution and the elementwise ops up to the pool
    output what the pool did (the fold was allowed because the shapes agree):
    say so in their recorded shapes, so that a later fold, or a later site's
    report row, reads the shapes as they are now, not as they were before."""
    cur = pool.args[0] if pool.args else pool.kwargs.get("input")
    while isinstance(cur, fx.Node):
        cur.meta[G.META] = out
        if cur is producer:
            return
        cur = cur.args[0]


def _fold(gm: fx.GraphModule, site: Site) -> Replaced:
    params: PoolParams = site.params
    producer, _ = _fold_chain(gm, site)
    conv = gm.get_submodule(producer.target)
    old_stride = tuple(conv.stride)
    conv.stride = params.stride
    node = site.node
    inp, out = G.input_info(node), G.info(node)  # read before the node is erased
    _now_pool_sized(producer, node, out)
    node.replace_all_uses_with(node.args[0] if node.args else node.kwargs["input"])
    gm.graph.erase_node(node)
    return Replaced(
        "maxpool", site.name, site.op,
        f"stride {_fmt(old_stride)}->{_fmt(params.stride)} on {producer.target}", inp.shape if inp else None,
        out.shape if out else None, exact=False, module=producer.target,
        detail=PoolRecord(params, PoolOutcome.FOLD))
