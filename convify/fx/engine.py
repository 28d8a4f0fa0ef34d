"""Applies a :class:`~convify.fx.rewrites.base.Rewrite` to a whole model.

``rewrite_model`` copies the model (unless ``inplace``), traces it, propagates
shapes from the example input, asks the rewrite for its sites, filters them by
``only``/``skip``, gives every call of a shared module its own name, applies
the rewrite site by site and returns the model with the :class:`Pass` that
records every site. When the model does not trace as a whole it falls back to
rewriting the largest submodules that do trace, in place.
Calibration and the report come after, in :mod:`convify.passes`.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from convify.core.report import Pass, Replaced, Skipped, Untraced
from convify.errors import ConvifyError, ExampleInputError, RewriteError, TraceError, one_line
from convify.fx import copying, nodes, shapes, tracing
from convify.fx.inputs import as_args
from convify.fx.rewrites import leaf_modules
from convify.fx.rewrites.base import NamesModules, Rewrite, Site
from convify.wording import counted


@dataclass
class _Collector:
    replaced: list[Replaced] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    untraced: list[Untraced] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    matched_patterns: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class _Filter:
    only: tuple[str, ...] | None
    skip: tuple[str, ...] | None

    def reason(self, name: str, col: _Collector) -> str | None:
        if self.only is not None:
            pat = nodes.matches(name, self.only)
            if pat is None:
                return f"not matched by only={list(self.only)}"
            col.matched_patterns.add(pat)
        pat = nodes.matches(name, self.skip)
        if pat is not None:
            col.matched_patterns.add(pat)
            return f"matched skip pattern {pat!r}"
        return None


@dataclass(frozen=True)
class RewriteResult:
    """The rewritten model and the pass that says what happened at every site."""

    model: nn.Module
    done: Pass


def rewrite_model(model: nn.Module, rewrite: Rewrite, example_input: Any = None, *,
                  only: str | Sequence[str] | None = None, skip: str | Sequence[str] | None = None,
                  inplace: bool = False) -> RewriteResult:
    """Apply ``rewrite`` everywhere in ``model``; see ``convify.replace_maxpool``."""
    if not isinstance(model, nn.Module):
        raise ConvifyError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TraceError("TorchScript modules cannot be traced by torch.fx; rewrite the Python model "
                         "before scripting it")
    work = model if inplace else copy_model(model)
    args = as_args(work, example_input)
    col = _Collector()
    filt = _Filter(nodes.as_patterns(only), nodes.as_patterns(skip))
    try:
        gm = tracing.trace(work, leaf_modules(), args)
    except TraceError as e:
        col.untraced.append(Untraced("", _reason(e)))
        result = _fallback(work, args, rewrite, filt, col)
    else:
        shapes.propagate_shapes(gm, *args)
        if _rewrite_graph(gm, "", rewrite, filt, col):
            result = gm
        else:  # nothing changed: hand back the (copied) model as it is
            result = work
    result.training = model.training
    if not col.replaced and not col.skipped:
        col.notes.append(rewrite.nothing_found(model))
    for pat in (filt.only or ()) + (filt.skip or ()):
        if pat not in col.matched_patterns:
            col.notes.append(f"pattern {pat!r} matched no {rewrite.name} site")
    done = Pass(
        rewrite=rewrite.name, options=rewrite.options.to_dict(), only=filt.only, skip=filt.skip,
        input_shape=tuple(args[0].shape) if len(args) == 1 else None,
        replaced=tuple(col.replaced), skipped=tuple(col.skipped),
        untraced=tuple(col.untraced), notes=tuple(dict.fromkeys(col.notes)),
    )
    return RewriteResult(result, done)


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy that shares nothing with ``model`` (cached non-leaf tensors copied as values)."""
    try:
        return copying.copy_module(model)
    except Exception as e:
        raise ConvifyError(f"{type(model).__name__} cannot be deep-copied ({one_line(e)}); pass inplace=True "
                           "to rewrite it without a copy") from e


def _reason(e: BaseException) -> str:
    text = str(e)
    return text.split(": ", 1)[1] if text.startswith("torch.fx cannot trace") else text


# --------------------------------------------------------------------------- one graph


def _rewrite_graph(gm: fx.GraphModule, prefix: str, rewrite: Rewrite, filt: _Filter, col: _Collector,
                   variants: Sequence[dict[fx.Node, shapes.TensorInfo | None]] = ()) -> bool:
    """Rewrite the sites of one traced graph; returns whether anything changed."""
    planned: list[Site] = []
    col.skipped.extend(_sites_inside_leaves(gm, prefix, rewrite))
    for site in rewrite.find_sites(gm):
        qual = nodes.join(prefix, site.name)
        reason = site.skip_reason or _variant_reason(site, variants) or filt.reason(qual, col)
        if reason:
            inp, out = shapes.input_info(site.node), shapes.info(site.node)
            col.skipped.append(Skipped(rewrite.name, qual, site.op, reason,
                                       inp.shape if inp else None, out.shape if out else None))
        else:
            planned.append(site)
    if not planned:
        return False
    _split_shared_modules(gm, planned, rewrite)
    for site in planned:
        try:
            row = rewrite.apply(gm, site)
        except ConvifyError:
            raise
        except Exception as e:
            raise RewriteError(f"{rewrite.name} failed at {nodes.join(prefix, site.name)!r} "
                               f"({site.node.format_node()}): {one_line(e)}") from e
        col.replaced.append(_qualified(row, prefix))
    col.notes.extend(rewrite.finish(gm, col.replaced))
    nodes.finalize(gm)
    return True


def _qualified(row: Replaced, prefix: str) -> Replaced:
    """``row`` with the names local to a submodule's graph made names in the model."""
    if not prefix:
        return row
    detail = row.detail.with_prefix(prefix) if isinstance(row.detail, NamesModules) else row.detail
    return dataclasses.replace(row, name=nodes.join(prefix, row.name),
                               module=nodes.join(prefix, row.module) if row.module else "", detail=detail)


def _sites_inside_leaves(gm: fx.GraphModule, prefix: str, rewrite: Rewrite) -> list[Skipped]:
    """Site modules hidden inside a module the tracer kept opaque (timm's
    registered leaves): reported, never silently left behind."""
    rows = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        leaf = gm.get_submodule(node.target)
        if rewrite.is_site_module(leaf) or type(leaf).__module__.startswith("torch.nn"):
            continue
        for name, inner in leaf.named_modules():
            if name and rewrite.is_site_module(inner):
                rows.append(Skipped(rewrite.name, nodes.join(prefix, nodes.join(node.target, name)), type(inner).__name__,
                                    f"inside {type(leaf).__name__}, which timm registers as a module torch.fx "
                                    "must not enter; rewrite that module's class by hand"))
    return rows


def _variant_reason(site: Site, variants: Sequence[dict[fx.Node, shapes.TensorInfo | None]]) -> str | None:
    """A submodule called several times from untraceable code must see the
    same channels at this site every time, or one new module cannot serve."""
    if len(variants) < 2:
        return None
    arg = site.node.args[0] if site.node.args else None
    if not isinstance(arg, fx.Node):
        return None
    channels = {v[arg].shape[1] for v in variants if v.get(arg) is not None and len(v[arg].shape) > 1}
    if len(channels) > 1:
        return (f"its module is called {counted(len(variants), 'time')} with {sorted(channels)} channels from code "
                "torch.fx cannot trace; one new module cannot serve them all")
    return None


def _split_shared_modules(gm: fx.GraphModule, planned: list[Site], rewrite: Rewrite) -> None:
    """Give each call of a shared module its own target, named like its site
    (``pool``, ``pool@1``), so that every site can get its own new module."""
    planned_targets = {s.node.target for s in planned if s.node.op == "call_module"}
    by_target: dict[str, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in planned_targets:
            by_target[node.target].append(node)
    for target, calls in by_target.items():
        if len(calls) < 2:
            continue
        module = gm.get_submodule(target)
        for k, node in enumerate(calls[1:], start=1):
            alias = nodes.free_name(gm, nodes.call_name(target, k))
            nodes.set_submodule(gm, alias, module)
            node.target = alias


# --------------------------------------------------------------------------- fallback


class _CallRecorder(TorchFunctionMode):
    """Records, on one forward pass, the inputs of every submodule, which
    module's own code called a site function (e.g. ``F.max_pool2d``), and
    which call reduced a map to one value per channel (``reductions``: by the
    id of the result, what made it), so that a graph whose input was reduced
    outside it can say where."""

    def __init__(self, root: nn.Module, is_site_function: Callable[[Callable], bool]):
        super().__init__()
        self.calls: dict[str, list[tuple[tuple, dict]]] = defaultdict(list)
        self.site_calls: list[tuple[str, Callable]] = []
        self.reductions: dict[int, tuple[str, torch.Tensor, bool]] = {}  # what made it, it, by a module
        self._types = {name: type(m).__name__ for name, m in root.named_modules()}
        self._stack: list[str] = []
        self._is_site_function = is_site_function
        self._handles = []
        for name, module in root.named_modules():
            self._handles.append(module.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post(name), always_call=True))

    def _pre(self, name: str):
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            self.calls[name].append((args, kwargs))
            self._stack.append(name)
        return hook

    def _post(self, name: str):
        def hook(_m: nn.Module, args: tuple, out: Any) -> None:
            if self._stack and self._stack[-1] == name:
                self._stack.pop()
            found = self.reductions.get(id(out))
            if found is not None and found[2]:
                return  # an inner module made it: the most precise name
            if args and shapes.reduces_space(args[0], out, same_channels=False):
                self.reductions[id(out)] = (f"{name or '<model>'} ({self._types.get(name, '?')}), called from code "
                                            "torch.fx could not trace", out, True)
        return hook

    def __torch_function__(self, func, types, args=(), kwargs=None):
        scope = self._stack[-1] if self._stack else ""
        if self._is_site_function(func):
            self.site_calls.append((scope, func))
        out = func(*args, **(kwargs or {}))
        if args and shapes.reduces_space(args[0], out):
            name = getattr(func, "__name__", "a reduction")
            self.reductions[id(out)] = (f"{name} in the forward of {scope or '<model>'}, which torch.fx could not "
                                        "trace", out, False)
        return out

    def made_by(self, value: Any) -> str | None:
        """What reduced ``value`` to one value per channel, if this forward did."""
        found = self.reductions.get(id(value))
        return found[0] if found is not None and found[1] is value else None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _record_calls(root: nn.Module, args: tuple, rewrite: Rewrite) -> _CallRecorder:
    recorder = _CallRecorder(root, rewrite.is_site_function)
    try:
        with torch.no_grad(), copying.eval_mode(root), recorder:
            root(*args)
    except Exception as e:
        raise ExampleInputError(
            f"the example input does not run through {type(root).__name__}: {one_line(e)}; "
            "pass an example_input of the shape the model expects"
        ) from e
    finally:
        recorder.remove()
    return recorder


def _fallback(root: nn.Module, args: tuple, rewrite: Rewrite, filt: _Filter, col: _Collector) -> nn.Module:
    """Rewrite the largest traceable submodules of an untraceable model in place."""
    recorder = _record_calls(root, args, rewrite)
    traced_prefixes: list[str] = []
    _visit(root, "", recorder, rewrite, filt, col, traced_prefixes)
    for scope, func in recorder.site_calls:
        if any(scope == p or scope.startswith(p + ".") for p in traced_prefixes):
            continue
        name = nodes.join(scope, rewrite.describe_function(func))
        if any(s.name == name for s in col.skipped):
            continue
        col.skipped.append(Skipped(
            rewrite.name, name, rewrite.describe_function(func),
            f"called from the forward of {scope or type(root).__name__!r}, which torch.fx cannot trace; "
            "make that forward traceable (or move the call into a submodule) to rewrite it"))
    return root


def _visit(module: nn.Module, prefix: str, recorder: _CallRecorder, rewrite: Rewrite, filt: _Filter,
           col: _Collector, traced_prefixes: list[str]) -> None:
    for child_name, child in list(module.named_children()):
        qual = nodes.join(prefix, child_name)
        calls = recorder.calls.get(qual)
        if not calls:
            continue  # never runs in this model's forward
        if rewrite.is_site_module(child):
            gm = _wrap_leaf(child, child_name)
            local_prefix = prefix
        else:
            try:
                gm = tracing.trace(child, leaf_modules(), *_one_call(calls))
            except TraceError as e:
                col.untraced.append(Untraced(qual, _reason(e)))
                _visit(child, qual, recorder, rewrite, filt, col, traced_prefixes)
                continue
            local_prefix = qual
            _mark_reduced_inputs(gm, calls[0], recorder)
        traced_prefixes.append(qual)
        variants = _propagate_calls(gm, calls, qual)
        first_row = len(col.replaced)
        if not _rewrite_graph(gm, local_prefix, rewrite, filt, col, variants):
            continue
        gm.training = child.training
        new = _unwrap(gm, child_name) if local_prefix == prefix else gm
        if new is gm and local_prefix == prefix:  # the wrapper stays: its module sits one level down
            col.replaced[first_row:] = [dataclasses.replace(r, module=nodes.join(qual, r.module.rsplit(".", 1)[-1]))
                                        for r in col.replaced[first_row:]]
        setattr(module, child_name, new)


def _mark_reduced_inputs(gm: fx.GraphModule, call: tuple[tuple, dict], recorder: _CallRecorder) -> None:
    """Placeholders whose tensor untraced code reduced to one value per
    channel say what did (``shapes.REDUCED_BY``): a dense head reading one cannot
    remove that pooling and says why."""
    args, kwargs = call
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for k, node in enumerate(placeholders):
        value = args[k] if k < len(args) else kwargs.get(node.target)
        made_by = recorder.made_by(value)
        if made_by is not None:
            node.meta[shapes.REDUCED_BY] = made_by


def _one_call(calls: list[tuple[tuple, dict]]) -> tuple[tuple, dict]:
    """The call a submodule is traced for: its first one, whose non-tensor
    arguments the graph keeps (every call must give the same, or no one
    graph serves them all)."""
    first = calls[0]
    for other in calls[1:]:
        differs = _differing_argument(first, other)
        if differs is not None:
            raise TraceError(f"its calls give {differs}; one graph holds the code for one of them")
    return first


def _differing_argument(a: tuple[tuple, dict], b: tuple[tuple, dict]) -> str | None:
    """What two calls give differently, other than tensors (``"'twice' different values"``), or None."""
    (args_a, kw_a), (args_b, kw_b) = a, b
    if len(args_a) != len(args_b) or set(kw_a) != set(kw_b):
        return "different arguments"
    pairs = [(f"argument {i}", x, y) for i, (x, y) in enumerate(zip(args_a, args_b))]
    pairs += [(repr(k), kw_a[k], kw_b[k]) for k in kw_a]
    for name, x, y in pairs:
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            continue
        try:
            same = x is y or (type(x) is type(y) and bool(x == y))
        except Exception:  # noqa: BLE001  (values that cannot be compared are not the same)
            same = False
        if not same:
            return f"{name} different values"
    return None


def _propagate_calls(gm: fx.GraphModule, calls: list[tuple[tuple, dict]], qual: str
                     ) -> list[dict[fx.Node, shapes.TensorInfo | None]]:
    """Shape-propagate every distinct call signature; the first one stays in
    ``node.meta``, all of them are returned for the consistency check."""
    seen: dict[tuple, tuple[tuple, dict]] = {}
    for a, kw in calls:
        key = tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else repr(t) for t in (*a, *kw.values()))
        seen.setdefault(key, (a, kw))
    variants = []
    for a, kw in reversed(list(seen.values())):  # the first call is propagated last: it stays in meta
        try:
            shapes.propagate_shapes(gm, *a, **kw)
        except ExampleInputError as e:
            raise ExampleInputError(f"in submodule {qual!r}: {e}") from e
        variants.append({n: shapes.info(n) for n in gm.graph.nodes})
    return variants


def _wrap_leaf(module: nn.Module, name: str) -> fx.GraphModule:
    """A one-call graph around a site module called from untraceable code."""
    root = nn.Module()
    root.add_module(name, module)
    graph = fx.Graph()
    x = graph.placeholder("input")
    graph.output(graph.call_module(name, (x,)))
    gm = fx.GraphModule(root, graph, type(module).__name__)
    gm.training = module.training
    return gm


def _unwrap(gm: fx.GraphModule, name: str) -> nn.Module:
    """The new module itself when the rewritten wrapper is just one call of it."""
    ops = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    if len(ops) == 1 and ops[0].op == "call_module" and not ops[0].kwargs and len(ops[0].args) == 1:
        return gm.get_submodule(ops[0].target)
    return gm
