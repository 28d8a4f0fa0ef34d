"""Linear classifier heads become convolutions (OverFeat; Long et al.'s FCN;
Lin et al.'s Network in Network for the global-average head).

A site is one head: a Linear fed by a flattened spatial map, plus every Linear
and elementwise op after it up to a model output. Walking back from the first
Linear::

    map (N, C, *S) -[global/adaptive avg pool]-[per-position ops]-> P -flatten-> (N, F) -[elementwise]-> Linear

and forward: Linear -[elementwise]-> Linear ... -> output (possibly inside a
tuple or namedtuple for auxiliary heads). A Linear whose result flows back
into a feature map (squeeze-excitation, attention, token MLPs) is no head and
no site. A Linear that looks like a head but cannot be converted is a skipped
site with the reason.

Modes:

* ``conv``: the first Linear becomes ``ConvNd(C, K, kernel=S_P)`` on ``P`` (its
  weight reshaped), every later Linear a 1x1 convolution, and a flatten keeps
  the ``(N, K)`` output. Exact at the traced size.
* ``gap``: a 1x1 convolution (the Linear's weight summed over ``S_P``), global
  average pooling, then the rest of the head as 1x1 convolutions and a flatten.
  Exact for GAP -> Linear heads; an initialization elsewhere.

``dense=True`` also removes what pins the spatial size: the final flatten, a
global average pooling (the head then runs at every position) and an adaptive
pooling that is an identity at the traced size.

Generated code, before and after (``resnet18``, ``dense=True``)::

    avgpool = self.avgpool(layer4);  flatten = torch.flatten(avgpool, 1);  fc = self.fc(flatten)
    fc = self.fc(layer4)                                  # Conv2d(512, 1000, 1)
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .. import graph as G
from .. import ops
from .. import weights as W
from ..report import Pass, Replaced
from .base import Rewrite, RewriteOptions, Site, option, register


_FLATTEN_METHODS = {"flatten", "view", "reshape", "squeeze"}
_FLATTEN_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze}
_REDUCE_METHODS = {"mean", "amax", "sum"}
_REDUCE_FUNCTIONS = {torch.mean: "mean", torch.amax: "amax", torch.sum: "sum"}
_REARRANGE_METHODS = {"permute", "transpose", "movedim", "swapaxes", "mT"}
_REARRANGE_FUNCTIONS = {torch.permute, torch.transpose, torch.movedim, torch.swapaxes}


@dataclass
class Pool:
    """The pooling in front of a head: its node, input and kind."""

    node: fx.Node
    source: fx.Node          # the feature map it pools
    kind: str                # "avg", "max"
    is_global: bool          # output is 1 at every spatial position
    is_identity: bool        # output size equals input size at the traced size
    desc: str


@dataclass
class Head:
    """Everything one head rewrite needs, found on the traced graph."""

    dims: int
    map_node: fx.Node | None         # P: the (N, C, *S) map that is flattened (None: reduced by ``pool``)
    spatial: tuple[int, ...]         # S_P (all 1 when the flatten is a global reduction)
    channels: int
    pool: Pool | None
    between: list[fx.Node]           # per-position ops from the pool's output to P, graph order
    pre_ops: list[fx.Node]           # 2-D elementwise ops from the flatten to the first Linear
    tree: list[fx.Node]              # the Linears and elementwise ops of the head, graph order
    linears: list[fx.Node] = field(default_factory=list)


# --------------------------------------------------------------------------- the head's convolution


class HeadConv2d(nn.Conv2d):
    """The ``Conv2d`` a Linear becomes: on CPU it runs as one matrix multiply.

    oneDNN's direct convolution is 2-3x slower than a GEMM on a head's shapes
    (a 6x6 kernel over 8x8 positions, 1x1 over 4096 channels); ``unfold`` +
    ``addmm`` computes the same sums, with the very GEMM the Linear ran at the
    native size. Exported (ONNX, ``torch.export``), compiled, scripted, traced
    and on other devices it is a plain convolution: ONNX sees ``Conv``.
    """

    convify_leaf = True  # convify's tracer records it as one module call, never its insides

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _plain_convolution_wanted(x) or self.padding_mode != "zeros" or self.groups != 1:
            return super().forward(x)
        return conv2d_as_matmul(x, self.weight, self.bias, self.stride, self.padding, self.dilation)


def _plain_convolution_wanted(x: torch.Tensor) -> bool:
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return True
    if torch.compiler.is_compiling():
        return True
    # a torch.fx Proxy, or a fake/functional tensor of an exporter: record a plain convolution
    return type(x) is not torch.Tensor or x.device.type != "cpu"


def conv2d_as_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     stride: tuple[int, ...] = (1, 1), padding: Any = (0, 0),
                     dilation: tuple[int, ...] = (1, 1)) -> torch.Tensor:
    """``F.conv2d`` (groups=1) as ``unfold`` and one ``(N*L, C*k*k) @ (C*k*k, K)`` GEMM."""
    n, _, h, w = x.shape
    k, c, kh, kw = weight.shape
    if isinstance(padding, str):
        return F.conv2d(x, weight, bias, stride, padding, dilation)
    out_h = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    positions = out_h * out_w
    if (kh, kw) == (1, 1) and tuple(stride) == (1, 1) and not any(padding):
        cols = x.reshape(n, c, positions)
    else:
        cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (N, C*kh*kw, L)
    flat_weight = weight.reshape(k, -1)
    if n == 1 or positions >= _MIN_POSITIONS:
        # channel-major (K, F) @ (F, L) per image: the result is already (N, K, H', W'), no copies
        if n == 1:
            out = flat_weight @ cols[0] if bias is None else torch.addmm(bias[:, None], flat_weight, cols[0])
            return out.view(1, k, out_h, out_w)
        out = flat_weight @ cols
        return (out if bias is None else out + bias[:, None]).view(n, k, out_h, out_w)
    # few positions, many images (the native size): one (N*L, F) @ (F, K) GEMM, the Linear's own
    rows = cols.transpose(1, 2).reshape(n * positions, -1)
    out = rows @ flat_weight.t() if bias is None else torch.addmm(bias, rows, flat_weight.t())
    return out.view(n, out_h, out_w, k).permute(0, 3, 1, 2).contiguous()


_MIN_POSITIONS = 16  # from here on a GEMM per image is as fast as one over all positions


# --------------------------------------------------------------------------- op recognition


def _is_stock_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward




def _shape(node: Any) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    found = G.info(node)
    return tuple(found.shape) if found is not None else None


def _is_flatten(node: fx.Node) -> bool:
    """A reshape of (N, *rest) to (N, prod(rest)): channel-major, like a kernel."""
    if node.op == "call_method" and node.target not in _FLATTEN_METHODS:
        return False
    if node.op == "call_function" and node.target not in _FLATTEN_FUNCTIONS:
        return False
    if node.op not in ("call_method", "call_function"):
        return False
    return _flattens(node)


def _flattens(node: fx.Node) -> bool:
    out, inp = _shape(node), _shape(node.args[0] if node.args else None)
    return (out is not None and inp is not None and len(out) == 2 and len(inp) >= 3
            and out[0] == inp[0] and out[1] == math.prod(inp[1:]))


def _reduce_dims(node: fx.Node) -> tuple[str, tuple[int, ...], bool] | None:
    """(op, normalized dims, keepdim) of a mean/amax/sum call, else None."""
    if node.op == "call_method" and node.target in _REDUCE_METHODS:
        op = node.target
    elif node.op == "call_function" and node.target in _REDUCE_FUNCTIONS:
        op = _REDUCE_FUNCTIONS[node.target]
    else:
        return None
    inp = _shape(node.args[0] if node.args else None)
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if inp is None or dims is None or not isinstance(keepdim, bool):
        return None
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    if not all(isinstance(d, int) for d in dims):
        return None
    return op, tuple(sorted(d % len(inp) for d in dims)), keepdim


def _is_spatial_reduction(node: fx.Node, keepdim: bool) -> bool:
    found = _reduce_dims(node)
    inp = _shape(node.args[0] if node.args else None)
    if found is None or inp is None or len(inp) < 3:
        return False
    _, dims, kd = found
    return kd == keepdim and dims == tuple(range(2, len(inp)))


def _is_rearrange(node: fx.Node) -> bool:
    return ((node.op == "call_method" and node.target in _REARRANGE_METHODS)
            or (node.op == "call_function" and node.target in _REARRANGE_FUNCTIONS))


def _permutation(node: fx.Node) -> tuple[int, ...] | None:
    if node.op == "call_method" and node.target == "permute":
        rest = node.args[1:] or (node.kwargs.get("dims"),)
    elif node.op == "call_function" and node.target is torch.permute:
        rest = node.args[1:] or (node.kwargs.get("dims"),)
    else:
        return None
    dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
    if not all(isinstance(d, int) for d in dims):
        return None
    return tuple(d % len(dims) for d in dims)


def _channel_norm_input(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node] | None:
    """The nodes of ``permute(channels last) -> layer_norm(C) -> permute(back)``
    ending at ``node`` (a LayerNorm over channels, per position: ConvNeXt's
    LayerNorm2d), else None."""
    perm_back = _permutation(node)
    if perm_back is None:
        return None
    n = len(perm_back)
    if perm_back != (0, n - 1, *range(1, n - 1)):
        return None
    norm = node.args[0]
    if not isinstance(norm, fx.Node) or not _is_channel_layer_norm(gm, norm):
        return None
    perm_last = norm.args[0]
    if not isinstance(perm_last, fx.Node) or _permutation(perm_last) != (0, *range(2, n), 1):
        return None
    return [perm_last, norm, node]


def _is_channel_layer_norm(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is F.layer_norm:
        shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
        return isinstance(shape, (tuple, list)) and len(shape) == 1
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return type(module) is nn.LayerNorm and len(module.normalized_shape) == 1
    return False


def _pool(gm: fx.GraphModule, node: fx.Node) -> Pool | None:
    """``node`` as a pooling that can sit in front of a head."""
    inp, out = _shape(node.args[0] if node.args else None), _shape(node)
    if inp is None or out is None or len(inp) < 3 or len(out) != len(inp):
        return None
    kind, desc = None, ""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.modules.pooling._AdaptiveAvgPoolNd):
            kind, desc = "avg", f"{type(module).__name__}({module.output_size})"
        elif isinstance(module, nn.modules.pooling._AdaptiveMaxPoolNd):
            kind, desc = "max", f"{type(module).__name__}({module.output_size})"
    elif node.op == "call_function" and node.target in ops.ADAPTIVE_AVG_POOL_FUNCTIONS.values():
        kind, desc = "avg", f"F.{node.target.__name__}"
    elif node.op == "call_function" and node.target in ops.ADAPTIVE_MAX_POOL_BY_DIMS.values():
        kind, desc = "max", f"F.{node.target.__name__}"
    elif _is_spatial_reduction(node, keepdim=True):
        op = _reduce_dims(node)[0]
        kind = {"mean": "avg", "amax": "max"}.get(op)
        desc = f"{op}(spatial, keepdim=True)"
    if kind is None:
        return None
    return Pool(node, node.args[0], kind, is_global=all(s == 1 for s in out[2:]),
                is_identity=out[2:] == inp[2:], desc=desc)


def _describe(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.Linear):
            return f"Linear({module.in_features}, {module.out_features})"
        return type(module).__name__
    return getattr(node.target, "__name__", str(node.target))


# --------------------------------------------------------------------------- the rewrite


@dataclass(frozen=True)
class HeadRecord:
    """The typed record of one converted head (``Replaced.detail``): its
    Linear modules in order and the kernel of the first convolution."""

    linears: tuple[str, ...]
    kernel: tuple[int, ...]


@dataclass(frozen=True)
class HeadOptions(RewriteOptions):
    """Options of :func:`convify.replace_linear_head`."""

    mode: str = option("conv", "Linear heads become exact convolutions, or a 1x1 conv + global average",
                       choices=("conv", "gap"))
    dense: bool = option(False, "fully convolutional: larger inputs give a map of scores")

    def wants_calibration(self) -> bool:
        return self.mode == "gap"


@register
class ReplaceLinearHead(Rewrite):
    """Linear heads become convolutions; see :class:`HeadOptions`."""

    name = "head"
    Options = HeadOptions
    keyword = "head"
    summary = "Linear heads become convolutions"
    order = 20
    onnx_ops = ("Gemm", "MatMul")
    options: HeadOptions

    def nothing_found(self, model: nn.Module) -> str:
        linears = sum(isinstance(m, nn.Linear) for m in model.modules())
        if linears == 0:
            return (f"no Linear head: {type(model).__name__} has no nn.Linear (its classifier is already "
                    "convolutional); nothing to do")
        return (f"no Linear head: none of the {linears} nn.Linear layers of {type(model).__name__} reads a "
                "flattened feature map on its way to an output (attention, squeeze-excitation and token "
                "MLPs are left alone)")

    @classmethod
    def onnx_ops_removed(cls, row: Replaced) -> int:
        return len(row.detail.linears) if isinstance(row.detail, HeadRecord) else 1

    def calibrate(self, teacher: nn.Module | None, model: nn.Module, done: Pass,
                  calibration: Sequence[Any]) -> Pass:
        from ..fit import fit_gap_heads  # noqa: PLC0415  (least squares: only with calibration data)

        return fit_gap_heads(teacher, model, done, calibration)

    # ------------------------------------------------------------------ finding

    def find_sites(self, gm: fx.GraphModule) -> list[Site]:
        sites: list[Site] = []
        taken: set[fx.Node] = set()
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        name_for = G.CallNames()  # a Linear called by several heads: one site per call, named like the engine's split
        for node in gm.graph.nodes:
            if node in taken:
                continue
            site = self._site_at(gm, node, order)
            if site is None:
                continue
            site.name = name_for(site.name)
            sites.append(site)
            if site.params is not None:
                taken.update(site.params.tree)
        return sites

    def _site_at(self, gm: fx.GraphModule, node: fx.Node, order: dict[fx.Node, int]) -> Site | None:
        functional = node.op == "call_function" and node.target is F.linear
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if not isinstance(module, nn.Linear):
                return None
        elif not functional:
            return None
        inp = _shape(node.args[0] if node.args else None)
        if inp is None or len(inp) != 2:
            return None  # a Linear on tokens or vectors, not on a flattened map
        found = self._walk_back(gm, node)
        if found is None:
            return None
        if _feeds_a_map(node):
            return None  # squeeze-excitation and the like: the result goes back into a feature map
        name = node.target if node.op == "call_module" else G.join(G.scope_of(node), "linear")
        reason = found if isinstance(found, str) else None
        if reason is None and functional:
            owner = _scope_type(node)
            if owner is not None and issubclass(owner, nn.Linear):
                name = G.scope_of(node)
                reason = (f"{owner.__name__} subclasses nn.Linear with its own forward (torch.fx traced into "
                          "it); its convolution would not compute the same")
            else:
                reason = ("functional F.linear: its weight is not a module; write the head with nn.Linear "
                          "to convert it")
        if reason is None and not _is_stock_linear(gm.get_submodule(node.target)):
            reason = (f"{type(gm.get_submodule(node.target)).__name__} subclasses nn.Linear with its own "
                      "forward; its convolution would not compute the same")
        if reason is None and not _reaches_output(node):
            reason = "its result does not reach a model output; convify converts classifier heads only"
        if reason is not None:
            return Site(name, node, _describe(gm, node) if not functional else "F.linear", skip_reason=reason)
        head: Head = found
        head.tree, head.linears = _head_tree(gm, node, order)
        return Site(name, node, self._describe_head(gm, head), params=head)

    def _walk_back(self, gm: fx.GraphModule, linear: fx.Node) -> Head | str | None:
        """The head in front of ``linear``: a Head, a reason it cannot be
        converted (a str), or None when ``linear`` is not fed by a flattened map."""
        pre_ops: list[fx.Node] = []
        cur = linear.args[0]
        while isinstance(cur, fx.Node) and ops.elementwise_kind(gm, cur) and len(_shape(cur) or ()) == 2:
            pre_ops.append(cur)
            cur = cur.args[0]
        if not isinstance(cur, fx.Node):
            return None
        pre_ops.reverse()
        if _is_spatial_reduction(cur, keepdim=False):
            source = cur.args[0]
            shape = _shape(source)
            op = _reduce_dims(cur)[0]
            pool = Pool(cur, source, {"mean": "avg", "amax": "max"}.get(op, op), True, False,
                        f"{op}(spatial)")
            return Head(len(shape) - 2, None, (1,) * (len(shape) - 2), shape[1], pool, [], pre_ops, [])
        if cur.op == "call_module":
            module = gm.get_submodule(cur.target)
            flat = isinstance(module, nn.Flatten) and type(module).forward is nn.Flatten.forward and _flattens(cur)
        else:
            flat = _is_flatten(cur)
        if not flat:
            return None
        map_node = cur.args[0]
        shape = _shape(map_node)
        between: list[fx.Node] = []
        walk = map_node
        while True:
            sandwich = _channel_norm_input(gm, walk)
            if sandwich is not None:
                between[:0] = sandwich
                walk = sandwich[0].args[0]
            elif ops.elementwise_kind(gm, walk):
                between.insert(0, walk)
                walk = walk.args[0]
            else:
                break
        if _is_rearrange(walk):
            return (f"the flattened map comes from {walk.format_node()}, which rearranges its dimensions; "
                    "its features are not in channel-major order, so no convolution kernel matches")
        pool = _pool(gm, walk)
        if pool is None:
            between = []  # nothing to move the head across: the map is P itself
        return Head(len(shape) - 2, map_node, tuple(shape[2:]), shape[1], pool, between, pre_ops, [])

    def _describe_head(self, gm: fx.GraphModule, head: Head) -> str:
        sizes = [gm.get_submodule(n.target) for n in head.linears]
        chain = "->".join([str(sizes[0].in_features)] + [str(m.out_features) for m in sizes])
        front = ""
        if head.pool is not None and (head.pool.is_global or head.map_node is None):
            front = f"{head.pool.desc} -> "
        space = "x".join(map(str, (head.channels, *head.spatial)))
        return f"{front}flatten({space}) -> Linear {chain}"

    # ------------------------------------------------------------------ applying

    def apply(self, gm: fx.GraphModule, site: Site) -> Replaced:
        head: Head = site.params
        mode, dense = self.options.mode, self.options.dense
        graph = gm.graph
        root = site.node
        notes: list[str] = []
        with graph.inserting_before(root):
            base, kernel, removed, pool_note = self._base_map(gm, head, mode, dense)
            if pool_note:
                notes.append(pool_note)
            env: dict[fx.Node, fx.Node] = {}
            cur = base
            for op in head.pre_ops:
                cur = graph.node_copy(op, lambda n, c=cur: c)
            for node in head.tree:
                if node.op == "call_module" and node in head.linears:
                    src = cur if node is root else env[node.args[0]]
                    first = node is root
                    conv = self._conv_for(gm, node, head, kernel if first else None, gap=first and mode == "gap")
                    new = graph.call_module(node.target, (src,))
                    G.set_submodule(gm, node.target, conv)
                    if first and mode == "gap" and not dense:
                        new = graph.call_function(ops.ADAPTIVE_AVG_POOL_FUNCTIONS[head.dims], (new, 1))
                elif node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.BatchNorm1d:
                    bn = _batchnorm_nd(gm.get_submodule(node.target), head.dims)
                    new = graph.call_module(node.target, (env[node.args[0]],))
                    G.set_submodule(gm, node.target, bn)
                else:
                    new = graph.node_copy(node, lambda n: env[n])
                env[node] = new
            flats: dict[fx.Node, fx.Node] = {}
            kept_flatten: list[str] = []
            stopped: list[str] = []
            for node in head.tree:
                for user in list(node.users):
                    if user in env:
                        continue
                    if dense and _is_output_like(user):
                        user.replace_input_with(node, env[node])
                        continue
                    if node not in flats:
                        flats[node] = graph.call_function(torch.flatten, (env[node], 1))
                    if dense:
                        kept_flatten.append(user.name)
                    if _reaches_linear(gm, user):
                        stopped.append(user.name)
                    user.replace_input_with(node, flats[node])
        for node in reversed(head.tree):
            graph.erase_node(node)
        if stopped:
            notes.append(f"the head ends at {', '.join(sorted(set(stopped)))} (not elementwise per feature, "
                         "e.g. a LayerNorm); the Linear layers after it stay Linear")
        if kept_flatten:
            notes.append(f"dense: kept the flatten before {', '.join(sorted(set(kept_flatten)))} "
                         "(only what goes straight to the output becomes a score map)")
        exact, exact_note = self._exactness(gm, head, mode, dense, removed)
        if exact_note:
            notes.append(exact_note)
        in_node = head.pool.source if removed or head.map_node is None else head.map_node
        return Replaced(self.name, site.name, site.op, self._describe_new(gm, head, kernel, mode, dense),
                        _shape(in_node),
                        self._out_shape(gm, head, kernel, mode, dense, removed), exact=exact,
                        module=root.target, notes=tuple(notes),
                        detail=HeadRecord(tuple(n.target for n in head.linears), tuple(kernel)))

    def _base_map(self, gm: fx.GraphModule, head: Head, mode: str, dense: bool
                  ) -> tuple[fx.Node, tuple[int, ...], str, str]:
        """The map the first convolution reads, its kernel, which pooling was
        removed ('' / 'global' / 'identity') and a note."""
        graph = gm.graph
        pool = head.pool
        want_free = dense or mode == "gap"  # the pool should not pin the size
        if head.map_node is None:  # a reduction over the spatial dims, fused with the flatten
            if want_free and pool.kind == "avg":
                return pool.source, head.spatial, "global", ""
            op, dims, _ = _reduce_dims(pool.node)
            kept = graph.call_method(op, (pool.source, dims), {"keepdim": True})
            note = "" if not want_free else f"{pool.desc} is no average: kept before the head"
            return kept, head.spatial, "", note
        if pool is None or not want_free:
            return head.map_node, head.spatial, "", _reduced_elsewhere_note(head) if dense and pool is None else ""
        if pool.kind != "avg":
            return head.map_node, head.spatial, "", f"{pool.desc} is no average: kept before the head"
        if not (pool.is_global or pool.is_identity):
            in_size = "x".join(map(str, _shape(pool.source)[2:]))
            out_size = "x".join(map(str, _shape(pool.node)[2:]))
            return head.map_node, head.spatial, "", (
                f"{pool.desc} resamples {in_size} to {out_size} at the traced size: it stays, so the head "
                "is exact only at this size and pins the output size; trace at the size where it is an "
                "identity (e.g. 224 for VGG/AlexNet) to make it dense")
        env = {pool.node: pool.source}
        cur = pool.source
        for node in head.between:
            cur = graph.node_copy(node, lambda n: env[n] if n in env else n)
            env[node] = cur
        removed = "global" if pool.is_global and not pool.is_identity else "identity"
        kernel = (1,) * head.dims if removed == "global" else head.spatial
        return cur, kernel, removed, ""

    def _conv_for(self, gm: fx.GraphModule, node: fx.Node, head: Head, kernel: tuple[int, ...] | None,
                  gap: bool) -> nn.Module:
        linear: nn.Linear = gm.get_submodule(node.target)
        weight = linear.weight
        dims = head.dims
        if kernel is None:  # a later Linear: it reads a channel vector at each position
            new_weight, in_ch, k = W.linear_to_pointwise_weight(weight, dims), linear.in_features, (1,) * dims
        elif gap:
            new_weight = W.linear_to_gap_weight(weight, head.channels, head.spatial)
            in_ch, k = head.channels, (1,) * dims
        else:
            new_weight, in_ch, k = W.linear_to_conv_weight(weight, head.channels, kernel), head.channels, kernel
        conv = (HeadConv2d if dims == 2 else ops.CONV_MODULES[dims])(in_ch, linear.out_features, k, bias=linear.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(new_weight)
            if linear.bias is not None:
                conv.bias.copy_(linear.bias)
        conv.train(linear.training)
        return conv

    def _exactness(self, gm: fx.GraphModule, head: Head, mode: str, dense: bool, removed: str
                   ) -> tuple[bool, str]:
        """Whether the head computes what it did at the traced size, and why not."""
        affine_front = all(ops.elementwise_kind(gm, n) is ops.Elementwise.AFFINE for n in head.between + head.pre_ops)
        affine_tail = all(n in head.linears or ops.elementwise_kind(gm, n) is ops.Elementwise.AFFINE or _is_eval_batchnorm(gm, n)
                          for n in head.tree)
        point_map = removed != "global" or all(s == 1 for s in _shape(head.pool.source)[2:])
        if mode == "conv" and (not dense or point_map):
            return True, ""
        if mode == "gap" and removed != "global":
            if all(s == 1 for s in head.spatial):
                return True, ""
            return False, ("gap: the Linear read a flattened map, so a global-average head cannot be exact; "
                           "initialized with its weights summed over the positions (exact on spatially "
                           "constant maps)")
        if mode == "gap" and not dense:
            if affine_front:
                return True, ""
            return False, ("gap: the ops between the pooling and the Linear are not affine (a LayerNorm, "
                           "an activation): averaging after them differs")
        if point_map:
            return True, ""
        if affine_front and affine_tail:
            return False, ("dense: the output is a score map; the head after the pooling is affine, so its "
                           "mean over the positions equals the original output at any input size")
        return False, ("dense: the output is a per-position classifier (the head after the pooling is not "
                       "affine: a non-linear MLP or a LayerNorm); its mean over the positions is not the "
                       "original output")

    def _describe_new(self, gm: fx.GraphModule, head: Head, kernel: tuple[int, ...], mode: str,
                      dense: bool) -> str:
        parts = []
        for k, node in enumerate(head.linears):
            conv = gm.get_submodule(node.target)
            ks = "x".join(map(str, conv.kernel_size))
            parts.append(f"Conv{head.dims}d({conv.in_channels}, {conv.out_channels}, k={ks})")
            if k == 0 and mode == "gap" and not dense:
                parts.append("GAP")
        if not dense:
            parts.append("flatten")
        return " -> ".join(parts)

    def _out_shape(self, gm: fx.GraphModule, head: Head, kernel: tuple[int, ...], mode: str, dense: bool,
                   removed: str) -> tuple[int, ...] | None:
        last = _shape(head.linears[-1])
        if last is None or not dense:
            return last
        if removed == "global":
            size = _shape(head.pool.source)[2:]
        elif head.map_node is not None:
            size = head.spatial
        else:
            size = (1,) * head.dims
        if mode == "conv":
            size = tuple(s - k + 1 for s, k in zip(size, kernel))
        return (*last, *size)


# --------------------------------------------------------------------------- graph walks


def _scope_type(node: fx.Node) -> type | None:
    """The class of the module whose forward made this call, from the tracer's stack."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    last = list(stack.values())[-1]
    owner = last[1] if isinstance(last, tuple) and len(last) > 1 else None
    return owner if isinstance(owner, type) else None


def _head_tree(gm: fx.GraphModule, root: fx.Node, order: dict[fx.Node, int]
               ) -> tuple[list[fx.Node], list[fx.Node]]:
    """The Linears and elementwise ops reachable from ``root`` through each
    other; every other user is a boundary that receives the flattened value."""
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    tree, frontier = {root}, [root]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in tree:
                continue
            if (_is_tree_linear(gm, user, node, calls) or ops.elementwise_kind(gm, user)
                    or _is_tree_batchnorm(gm, user, node, calls)):
                tree.add(user)
                frontier.append(user)
    ordered = sorted(tree, key=order.__getitem__)
    linears = [n for n in ordered if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Linear)]
    return ordered, linears


def _is_tree_linear(gm: fx.GraphModule, user: fx.Node, src: fx.Node, calls: dict[str, int]) -> bool:
    if user.op != "call_module" or user.args != (src,) or user.kwargs:
        return False
    return _is_stock_linear(gm.get_submodule(user.target)) and calls.get(user.target) == 1


def _is_tree_batchnorm(gm: fx.GraphModule, user: fx.Node, src: fx.Node, calls: dict[str, int]) -> bool:
    """A BatchNorm1d between two of the head's Linears: per feature on (N, F),
    so the same statistics as a BatchNorm2d on (N, F, 1, 1) compute it exactly."""
    if user.op != "call_module" or user.args != (src,) or user.kwargs or calls.get(user.target) != 1:
        return False
    module = gm.get_submodule(user.target)
    shape = _shape(src)
    return (type(module) is nn.BatchNorm1d and shape is not None and len(shape) == 2)


def _is_eval_batchnorm(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "call_module":
        return False
    module = gm.get_submodule(node.target)
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.training


def _batchnorm_nd(bn: nn.BatchNorm1d, dims: int) -> nn.Module:
    """The BatchNorm1d of a head as the BatchNorm{2,3}d that reads its conv's map."""
    cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    ref = bn.running_mean if bn.running_mean is not None else bn.weight
    new = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
              track_running_stats=bn.track_running_stats,
              device=ref.device if ref is not None else None, dtype=ref.dtype if ref is not None else None)
    new.load_state_dict(bn.state_dict())
    new.train(bn.training)
    return new


def _feeds_a_map(node: fx.Node) -> bool:
    """True when anything computed from ``node`` is a tensor with spatial dims
    again (squeeze-excitation gates, attention mixed back into a feature map)."""
    seen, frontier = {node}, [node]
    while frontier:
        cur = frontier.pop()
        for user in cur.users:
            if user in seen or user.op == "output":
                continue
            seen.add(user)
            shape = _shape(user)
            items = user.meta.get(G.META + "_items") or ()
            if (shape is not None and len(shape) >= 3) or any(i is not None and len(i.shape) >= 3 for i in items):
                return True
            frontier.append(user)
    return False


def _reaches_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` or anything computed from it calls a Linear."""
    seen, frontier = {node}, [node]
    while frontier:
        cur = frontier.pop()
        if cur.op == "call_module" and isinstance(gm.get_submodule(cur.target), nn.Linear):
            return True
        for user in cur.users:
            if user not in seen:
                seen.add(user)
                frontier.append(user)
    return False


def _reaches_output(node: fx.Node) -> bool:
    seen, frontier = {node}, [node]
    while frontier:
        cur = frontier.pop()
        for user in cur.users:
            if user.op == "output":
                return True
            if user not in seen:
                seen.add(user)
                frontier.append(user)
    return False


def _reduced_elsewhere_note(head: Head) -> str:
    """dense=True on a map reduced to one value per channel where no rewrite
    sees it (code torch.fx could not trace, a module it does not enter)."""
    if head.map_node is None or any(s != 1 for s in head.spatial):
        return ""
    who = G.reduced_by(head.map_node)
    if who is None:
        return ""
    return (f"dense: the map is reduced to one value per channel before the head by {who}, where no rewrite can "
            "remove it; it stays, so the output is 1x1 at any input size (make that code traceable to get a score "
            "map)")


def _is_output_like(node: fx.Node) -> bool:
    """The output itself, or a container built only for it (``G.is_output_like``:
    a tuple, namedtuple or dataclass such as transformers' ``ModelOutput``)."""
    return G.is_output_like(node)
