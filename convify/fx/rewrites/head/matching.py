"""Finding heads: walking a shape-propagated graph back from a Linear to the
map it reads, and forward to the outputs it feeds.

Nothing here changes the graph. :func:`walk_back` recognizes the flatten (or
the spatial reduction fused with it), the per-position ops and the pooling in
front of it; :func:`head_tree` collects the Linears and elementwise ops after
it. The result is a :class:`Head`.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from convify.fx import nodes, ops, shapes

_FLATTEN_METHODS = {"flatten", "view", "reshape", "squeeze"}
_FLATTEN_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze}
_REDUCE_METHODS = {"mean", "amax", "sum"}
_REDUCE_FUNCTIONS = {torch.mean: "mean", torch.amax: "amax", torch.sum: "sum"}
_REARRANGE_METHODS = {"permute", "transpose", "movedim", "swapaxes", "mT"}
_REARRANGE_FUNCTIONS = {torch.permute, torch.transpose, torch.movedim, torch.swapaxes}


class PoolKind(enum.Enum):
    """What the pooling (or spatial reduction) in front of a head computes."""

    AVG = "avg"    # adaptive average pooling, mean: commutes with the head's first convolution
    MAX = "max"    # adaptive max pooling, amax
    SUM = "sum"    # a sum over the spatial dims (seen fused with the flatten only)


_REDUCTION_KINDS = {"mean": PoolKind.AVG, "amax": PoolKind.MAX, "sum": PoolKind.SUM}


@dataclass(frozen=True)
class Pool:
    """The pooling in front of a head: its node, input and kind."""

    node: fx.Node
    source: fx.Node          # the feature map it pools
    kind: PoolKind
    is_global: bool          # output is 1 at every spatial position
    is_identity: bool        # output size equals input size at the traced size
    desc: str


@dataclass(frozen=True)
class Head:
    """Everything one head rewrite needs, found on the traced graph."""

    dims: int
    map_node: fx.Node | None         # P: the (N, C, *S) map that is flattened (None: reduced by ``pool``)
    spatial: tuple[int, ...]         # S_P (all 1 when the flatten is a global reduction)
    channels: int
    pool: Pool | None
    between: tuple[fx.Node, ...]     # per-position ops from the pool's output to P, graph order
    pre_ops: tuple[fx.Node, ...]     # 2-D elementwise ops (or a LayerNorm over features) from the flatten to the first Linear
    tree: tuple[fx.Node, ...] = ()   # the Linears and elementwise ops of the head, graph order
    linears: tuple[fx.Node, ...] = ()


# --------------------------------------------------------------------------- the head in front of a Linear


def walk_back(gm: fx.GraphModule, linear: fx.Node) -> Head | str | None:
    """The head in front of ``linear`` (without its tree: see :func:`head_tree`),
    a reason it cannot be converted (a str), or None when ``linear`` is not fed
    by a flattened map."""
    pre_ops: list[fx.Node] = []
    cur = linear.args[0]
    while (isinstance(cur, fx.Node) and len(shape(cur) or ()) == 2
           and (ops.elementwise_kind(gm, cur) or is_feature_layer_norm(gm, cur))):
        pre_ops.append(cur)
        cur = cur.args[0]
    if not isinstance(cur, fx.Node):
        return None
    pre_ops.reverse()
    found = _walk_back_from(gm, cur, pre_ops)
    if isinstance(found, Head) and any(is_feature_layer_norm(gm, n) for n in pre_ops) and any(
            s != 1 for s in found.spatial):
        return ("a LayerNorm normalizes the flattened C*H*W features before the Linear; only a LayerNorm over the "
                "channels of a 1x1 map (after a global pooling, as in ConvNeXt) becomes a per-position one")
    return found


def is_feature_layer_norm(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A LayerNorm over the last dimension of an (N, F) vector (HF ConvNeXt's
    norm after the global average): on a map it is a LayerNorm over channels."""
    return _is_channel_layer_norm(gm, node) and isinstance(node.args[0], fx.Node) and len(
        shape(node.args[0]) or ()) == 2


def _walk_back_from(gm: fx.GraphModule, cur: fx.Node, pre_ops: list[fx.Node]) -> Head | str | None:
    if _is_spatial_reduction(cur, keepdim=False):
        source = cur.args[0]
        size = shape(source)
        op = reduce_dims(cur)[0]
        pool = Pool(cur, source, _REDUCTION_KINDS[op], True, False, f"{op}(spatial)")
        return Head(len(size) - 2, None, (1,) * (len(size) - 2), size[1], pool, (), tuple(pre_ops))
    if cur.op == "call_module":
        module = gm.get_submodule(cur.target)
        flat = isinstance(module, nn.Flatten) and type(module).forward is nn.Flatten.forward and _flattens(cur)
    else:
        flat = _is_flatten(cur)
    if not flat:
        return None
    map_node = cur.args[0]
    size = shape(map_node)
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
    return Head(len(size) - 2, map_node, tuple(size[2:]), size[1], pool, tuple(between), tuple(pre_ops))


def head_tree(gm: fx.GraphModule, root: fx.Node, order: dict[fx.Node, int]
              ) -> tuple[tuple[fx.Node, ...], tuple[fx.Node, ...]]:
    """The Linears and elementwise ops reachable from ``root`` through each
    other, and the Linears among them, in graph order; every other user is a
    boundary that receives the flattened value."""
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
    ordered = tuple(sorted(tree, key=order.__getitem__))
    linears = tuple(n for n in ordered
                    if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Linear))
    return ordered, linears


def describe_head(gm: fx.GraphModule, head: Head) -> str:
    """The site's ``old`` column: ``AdaptiveAvgPool2d(1) -> flatten(512x1x1) -> Linear 512->1000``."""
    sizes = [gm.get_submodule(n.target) for n in head.linears]
    chain = "->".join([str(sizes[0].in_features)] + [str(m.out_features) for m in sizes])
    front = ""
    if head.pool is not None and (head.pool.is_global or head.map_node is None):
        front = f"{head.pool.desc} -> "
    space = "x".join(map(str, (head.channels, *head.spatial)))
    return f"{front}flatten({space}) -> Linear {chain}"


def describe_node(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.Linear):
            return f"Linear({module.in_features}, {module.out_features})"
        return type(module).__name__
    return getattr(node.target, "__name__", str(node.target))


# --------------------------------------------------------------------------- op recognition


def shape(node: Any) -> tuple[int, ...] | None:
    """The recorded shape of ``node``'s tensor, or None (no node, no record)."""
    if not isinstance(node, fx.Node):
        return None
    found = shapes.info(node)
    return tuple(found.shape) if found is not None else None


def is_stock_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def reduce_dims(node: fx.Node) -> tuple[str, tuple[int, ...], bool] | None:
    """(op, normalized dims, keepdim) of a mean/amax/sum call, else None."""
    if node.op == "call_method" and node.target in _REDUCE_METHODS:
        op = node.target
    elif node.op == "call_function" and node.target in _REDUCE_FUNCTIONS:
        op = _REDUCE_FUNCTIONS[node.target]
    else:
        return None
    inp = shape(node.args[0] if node.args else None)
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if inp is None or dims is None or not isinstance(keepdim, bool):
        return None
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    if not all(isinstance(d, int) for d in dims):
        return None
    return op, tuple(sorted(d % len(inp) for d in dims)), keepdim


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
    out, inp = shape(node), shape(node.args[0] if node.args else None)
    return (out is not None and inp is not None and len(out) == 2 and len(inp) >= 3
            and out[0] == inp[0] and out[1] == math.prod(inp[1:]))


def _is_spatial_reduction(node: fx.Node, keepdim: bool) -> bool:
    found = reduce_dims(node)
    inp = shape(node.args[0] if node.args else None)
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
        normalized = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
        return isinstance(normalized, (tuple, list)) and len(normalized) == 1
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return type(module) is nn.LayerNorm and len(module.normalized_shape) == 1
    return False


def _pool(gm: fx.GraphModule, node: fx.Node) -> Pool | None:
    """``node`` as a pooling that can sit in front of a head."""
    inp, out = shape(node.args[0] if node.args else None), shape(node)
    if inp is None or out is None or len(inp) < 3 or len(out) != len(inp):
        return None
    kind, desc = None, ""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.modules.pooling._AdaptiveAvgPoolNd):
            kind, desc = PoolKind.AVG, f"{type(module).__name__}({module.output_size})"
        elif isinstance(module, nn.modules.pooling._AdaptiveMaxPoolNd):
            kind, desc = PoolKind.MAX, f"{type(module).__name__}({module.output_size})"
    elif node.op == "call_function" and node.target in ops.ADAPTIVE_AVG_POOL_FUNCTIONS.values():
        kind, desc = PoolKind.AVG, f"F.{node.target.__name__}"
    elif node.op == "call_function" and node.target in ops.ADAPTIVE_MAX_POOL_BY_DIMS.values():
        kind, desc = PoolKind.MAX, f"F.{node.target.__name__}"
    elif _is_spatial_reduction(node, keepdim=True):
        op = reduce_dims(node)[0]
        kind = _REDUCTION_KINDS[op] if op in ("mean", "amax") else None  # a keepdim sum is no pooling
        desc = f"{op}(spatial, keepdim=True)"
    if kind is None:
        return None
    return Pool(node, node.args[0], kind, is_global=all(s == 1 for s in out[2:]),
                is_identity=out[2:] == inp[2:], desc=desc)


# --------------------------------------------------------------------------- the head's tree and its users


def scope_type(node: fx.Node) -> type | None:
    """The class of the module whose forward made this call, from the tracer's stack."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    last = list(stack.values())[-1]
    owner = last[1] if isinstance(last, tuple) and len(last) > 1 else None
    return owner if isinstance(owner, type) else None


def _is_tree_linear(gm: fx.GraphModule, user: fx.Node, src: fx.Node, calls: dict[str, int]) -> bool:
    if user.op != "call_module" or user.args != (src,) or user.kwargs:
        return False
    return is_stock_linear(gm.get_submodule(user.target)) and calls.get(user.target) == 1


def _is_tree_batchnorm(gm: fx.GraphModule, user: fx.Node, src: fx.Node, calls: dict[str, int]) -> bool:
    """A BatchNorm1d between two of the head's Linears: per feature on (N, F),
    so the same statistics as a BatchNorm2d on (N, F, 1, 1) compute it exactly."""
    if user.op != "call_module" or user.args != (src,) or user.kwargs or calls.get(user.target) != 1:
        return False
    module = gm.get_submodule(user.target)
    size = shape(src)
    return type(module) is nn.BatchNorm1d and size is not None and len(size) == 2


def feeds_a_map(node: fx.Node) -> bool:
    """True when anything computed from ``node`` is a tensor with spatial dims
    again (squeeze-excitation gates, attention mixed back into a feature map)."""
    seen, frontier = {node}, [node]
    while frontier:
        cur = frontier.pop()
        for user in cur.users:
            if user in seen or user.op == "output":
                continue
            seen.add(user)
            size = shape(user)
            items = user.meta.get(shapes.META + "_items") or ()
            if (size is not None and len(size) >= 3) or any(i is not None and len(i.shape) >= 3 for i in items):
                return True
            frontier.append(user)
    return False


def reaches_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
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


def reaches_output(node: fx.Node) -> bool:
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


def is_output_like(node: fx.Node) -> bool:
    """The output itself, or a container built only for it (``nodes.is_output_like``:
    a tuple, namedtuple or dataclass such as transformers' ``ModelOutput``)."""
    return nodes.is_output_like(node)
