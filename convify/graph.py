"""Tracing, shape propagation and graph helpers shared by every rewrite.

Nothing in here is specific to one rewrite: rewrites find their sites in a
traced ``torch.fx.GraphModule`` whose nodes carry a :class:`TensorInfo` in
``node.meta["convify"]`` (written by :class:`ShapeProp`).
"""
from __future__ import annotations

import contextlib
import fnmatch
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from . import ops
from .errors import ExampleInputError, TraceError, one_line

META = "convify"

@dataclass(frozen=True)
class TensorInfo:
    """Shape, dtype and device of the tensor a node produced on the example input."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


# --------------------------------------------------------------------------- tracing


def _timm_leaf_modules() -> tuple[tuple[type, ...], tuple[Callable, ...]]:
    """timm registers modules and functions its own FX tracer must not enter;
    honouring them lets more timm models trace whole. Only looked up when timm
    is already imported (by the user who built the model)."""
    if "timm" not in sys.modules:
        return (), ()
    try:
        from timm.layers import _fx  # type: ignore[attr-defined]
    except Exception:  # older or newer timm without the registry
        return (), ()
    leaves = tuple(m for m in getattr(_fx, "_leaf_modules", ()) if isinstance(m, type))
    funcs = tuple(getattr(_fx, "_autowrap_functions", ()))
    return leaves, funcs


class ConvifyTracer(fx.Tracer):
    """``fx.Tracer`` that never walks into the modules it is told are sites.

    The rewrites declare their site modules (``Rewrite.leaf_modules``): a
    MaxPool subclass with its own forward (timm's ``MaxPool2dSame`` pads with
    -inf first) must stay one call_module node, so that the rewrite sees it as
    the pooling it is and can refuse it, instead of finding the bare
    ``F.max_pool2d`` inside it. Classes with ``convify_leaf = True`` (the
    opt-in ``MatmulConv2d`` of ``convify.matmul_heads``, whose forward has a
    CPU path) stay one call too, so a sped-up model retraces to the same graph.
    """

    def __init__(self, extra_leaves: tuple[type, ...] = (), autowrap_functions: tuple[Callable, ...] = ()):
        super().__init__(autowrap_functions=autowrap_functions)
        self.extra_leaves = extra_leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if getattr(type(m), "convify_leaf", False):
            return True
        if self.extra_leaves and isinstance(m, self.extra_leaves):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(module: nn.Module, leaf_modules: tuple[type[nn.Module], ...] = ()) -> fx.GraphModule:
    """Trace ``module`` in the train/eval mode it is in, keeping instances of
    ``leaf_modules`` as one call each.

    Raises :class:`TraceError` with torch.fx's reason when it cannot be traced.
    """
    if isinstance(module, fx.GraphModule):
        # Already a graph: reuse it (a second rewrite of a rewritten model).
        return fx.GraphModule(module, module.graph.__deepcopy__(), class_name=module.__class__.__name__)
    leaves, funcs = _timm_leaf_modules()
    tracer = ConvifyTracer(tuple(leaf_modules) + leaves, funcs)
    try:
        graph = tracer.trace(module)
    except Exception as e:  # FX raises anything: TraceError, TypeError, AssertionError...
        raise TraceError(f"torch.fx cannot trace {type(module).__name__}: {one_line(e)}") from e
    name = module.__class__.__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.training = module.training
    return gm


# --------------------------------------------------------------------------- modes


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Run in eval mode, then restore every submodule's own flag (a model in
    train mode may hold frozen BatchNorms in eval: those stay as they were)."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


# --------------------------------------------------------------------------- shapes


def _info(value: Any) -> TensorInfo | None:
    if isinstance(value, torch.Tensor):
        return TensorInfo(tuple(value.shape), value.dtype, value.device)
    return None


class ShapeProp(fx.Interpreter):
    """Run the graph on an example input and record each node's output
    :class:`TensorInfo` in ``node.meta["convify"]`` (None for non-tensors).

    Runs under ``no_grad`` with every module in eval mode so that BatchNorm
    statistics are not touched and batch size 1 works; shapes do not depend on
    the mode, the graph's mode-dependent branches were fixed when it was traced.
    """

    def __init__(self, gm: fx.GraphModule, shortcut_shape_preserving: bool = False) -> None:
        super().__init__(gm)
        self.shortcut = shortcut_shape_preserving

    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        # On meta tensors nothing is computed anyway: a module that keeps its
        # input's shape and dtype can hand the input on. BatchNorm's meta
        # kernel alone was a third of googlenet's shape propagation.
        if self.shortcut and not kwargs and len(args) == 1 and isinstance(args[0], torch.Tensor):
            module = self.fetch_attr(target)
            if type(module) in ops.SHAPE_PRESERVING_MODULES and args[0].is_floating_point():
                return args[0]
        return super().call_module(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as e:
            raise ExampleInputError(
                f"the example input does not run through node {n.name!r} ({n.format_node()}): "
                f"{one_line(e)}; pass an example_input of the shape the model expects"
            ) from e
        n.meta[META] = _info(result)
        if isinstance(result, (tuple, list)):
            n.meta[META + "_items"] = tuple(_info(v) for v in result)
        return result


@contextlib.contextmanager
def meta_weights(module: nn.Module) -> Iterator[None]:
    """Swap every parameter and buffer for a data-less meta tensor while the
    block runs. Shapes come out the same and convolutions cost nothing: shape
    propagation on densenet121 at 224 drops from a real forward (~0.1-7 s on a
    busy 2-core machine) to ~0.2 s of interpreter overhead."""
    from torch.nn.utils.stateless import _reparametrize_module  # noqa: PLC0415

    state = {name: torch.empty_like(t, device="meta")
             for name, t in [*module.named_parameters(remove_duplicate=False),
                             *module.named_buffers(remove_duplicate=False)]}
    with _reparametrize_module(module, state):
        yield


def _to_meta(value: Any) -> Any:
    return value.to("meta") if isinstance(value, torch.Tensor) else value


def propagate_shapes(gm: fx.GraphModule, *args: Any, **kwargs: Any) -> Any:
    """Record every node's output shape, dtype and device for this input.

    Tries meta tensors first (no arithmetic); anything that needs real data
    (``.item()``, a tensor attribute that is not a buffer) reruns for real.
    """
    device = next((a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
    try:
        with torch.no_grad(), eval_mode(gm), meta_weights(gm):
            _run(gm, tuple(map(_to_meta, args)), {k: _to_meta(v) for k, v in kwargs.items()}, shortcut=True)
    except Exception:
        pass
    else:
        for n in gm.graph.nodes:
            _relocate(n, device)
        return None
    with torch.no_grad(), eval_mode(gm):
        return _run(gm, args, kwargs)


def _relocate(n: fx.Node, device: torch.device | None) -> None:
    """Meta shapes stand for tensors on the example input's device."""
    found = n.meta.get(META)
    if isinstance(found, TensorInfo) and device is not None:
        n.meta[META] = TensorInfo(found.shape, found.dtype, device)
    items = n.meta.get(META + "_items")
    if items and device is not None:
        n.meta[META + "_items"] = tuple(TensorInfo(i.shape, i.dtype, device) if i else None for i in items)


def _run(gm: fx.GraphModule, args: tuple, kwargs: dict, shortcut: bool = False) -> Any:
    return ShapeProp(gm, shortcut).run(*args) if not kwargs else _run_with_kwargs(gm, args, kwargs, shortcut)


def _run_with_kwargs(gm: fx.GraphModule, args: tuple, kwargs: dict, shortcut: bool = False) -> Any:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    bound = list(args)
    for p in placeholders[len(args):]:
        if p.target in kwargs:
            bound.append(kwargs[p.target])
        elif p.args:
            bound.append(p.args[0])
        else:
            raise ExampleInputError(f"no value for input {p.target!r} of the traced forward")
    return ShapeProp(gm, shortcut).run(*bound)


def info(node: fx.Node) -> TensorInfo | None:
    """The recorded output of ``node`` (None when it was not a tensor or never ran)."""
    value = node.meta.get(META)
    return value if isinstance(value, TensorInfo) else None


def input_info(node: fx.Node) -> TensorInfo | None:
    first = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    return info(first) if isinstance(first, fx.Node) else None


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
