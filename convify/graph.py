"""Tracing, shape propagation and graph helpers shared by every rewrite.

Nothing in here is specific to one rewrite: rewrites find their sites in a
traced ``torch.fx.GraphModule`` whose nodes carry a :class:`TensorInfo` in
``node.meta["convify"]`` (written by :class:`ShapeProp`).

Tracing (:func:`trace`) is torch.fx's symbolic tracing, shape-specialized
only where plain torch.fx gives up, and guarded there. The rewrites need
module calls, so ``make_fx`` (an aten-level IR) is no option, and
``torch.fx.experimental.meta_tracer.MetaTracer`` gives every ``x.shape`` a
concrete value, which would fix the batch and image size in every reshape.
Here proxies stay symbolic; only when Python needs a value (a branch,
``int()``, ``len()``, iteration) is it worked out by running the graph traced
so far on meta copies of the example (no arithmetic), and the graph gets a
guard that raises for an input that would give another value. Values that
depend on tensor data stay unknown, so such control flow stays untraceable.
Forward arguments beyond the example tensors keep their values, as
``concrete_args`` would (which breaks on decorated forwards with ``*args,
**kwargs``, as transformers' are).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import enum
import fnmatch
import functools
import inspect
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from . import ops
from .errors import ExampleInputError, TraceError, UsageError, one_line

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
    """``fx.Tracer`` that never walks into the modules it is told are sites,
    and that traces a forward as it is called on an example input.

    Leaves: the rewrites declare their site modules (``Rewrite.leaf_modules``):
    a MaxPool subclass with its own forward (timm's ``MaxPool2dSame`` pads with
    -inf first) must stay one call_module node, so that the rewrite sees it as
    the pooling it is and can refuse it, instead of finding the bare
    ``F.max_pool2d`` inside it. Classes with ``convify_leaf = True`` (the
    opt-in ``MatmulConv2d`` of ``convify.matmul_heads``, whose forward has a
    CPU path) stay one call too, so a sped-up model retraces to the same graph.

    Given an :class:`ExampleCall`, it also traces what plain ``fx.Tracer``
    cannot (see :func:`trace`): forward arguments beyond the example tensors
    keep their Python values, a branch on shapes follows the example input
    (guarded), and a dataclass-like dict output (``ModelOutput``) is rebuilt
    by calling its class.
    """

    def __init__(self, extra_leaves: tuple[type, ...] = (), autowrap_functions: tuple[Callable, ...] = (),
                 call: ExampleCall | None = None):
        super().__init__(autowrap_functions=autowrap_functions)
        self.extra_leaves = extra_leaves
        self.call = call
        self._values: _ExampleValues | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if getattr(type(m), "convify_leaf", False):
            return True
        if self.extra_leaves and isinstance(m, self.extra_leaves):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    # ------------------------------------------------------------------ arguments

    def create_args_for_root(self, root_fn: Callable, is_module: bool, concrete_args: Any = None) -> tuple:
        """Placeholders for the example call's tensors; every other argument
        keeps its value (a literal one stays a guarded keyword of the graph)."""
        if self.call is None or not is_module or concrete_args is not None:
            return super().create_args_for_root(root_fn, is_module, concrete_args)
        values: dict[str, Any] = {}
        examples: dict[fx.Node, Any] = {}
        defaulted = False  # Python wants a default on every parameter after one that has one
        for slot in self.call.slots:
            if slot.kind is SlotKind.INPUT:
                proxy = self.create_proxy("placeholder", slot.name, (None,) if defaulted else (), {})
                examples[proxy.node] = slot.value
                values[slot.name] = proxy
                continue
            values[slot.name] = slot.value
            if slot.kind is SlotKind.FIXED:
                proxy = self.create_proxy("placeholder", slot.name, (slot.default,), {})
                self.create_proxy("call_function", check_traced_argument, (proxy, slot.value, slot.name), {})
                examples[proxy.node] = slot.value
                defaulted = True
        self._values = _ExampleValues(self.root, examples) if self.call.has_example else None
        call = self.call

        def forward(root):  # type: ignore[no-untyped-def]  (no annotation: fx would print it in the code)
            args, kwargs = call.arguments(values)
            return root_fn(root, *args, **kwargs)

        return forward, [self.root]

    # ------------------------------------------------------------------ values the trace needs

    def to_bool(self, obj: fx.Proxy) -> bool:
        """A branch on a value computed from shapes alone follows the example
        input, and a guard in the graph raises if a later input would branch
        the other way; a branch on tensor data stays untraceable."""
        if self._values is None:
            return super().to_bool(obj)
        why = "symbolically traced variables cannot be used as inputs to control flow"
        try:
            value = self._values.of(obj.node)
        except Exception as e:
            raise fx.proxy.TraceError(f"{why} (and its value on the example input is unknown: {one_line(e)})") from e
        if not isinstance(value, (bool, int)):
            raise fx.proxy.TraceError(f"{why} (the condition {obj.node.name!r} depends on tensor data, not only on "
                                      "shapes)")
        taken = bool(value)
        self.create_proxy("call_function", check_traced_branch, (obj, taken, self._where()), {})
        return taken

    def iter(self, obj: fx.Proxy) -> Iterator:
        """A tuple, list or shape iterates as its items, as many as on the
        example input (a tensor does not: that would fix the batch size)."""
        value = self._value_or_none(obj)
        if isinstance(value, (tuple, list)):
            return iter([obj[i] for i in range(len(value))])
        return super().iter(obj)

    def length(self, obj: fx.Proxy) -> int:
        """``len()`` of a tuple, list or shape: as on the example input (the
        number of dimensions, never a size)."""
        value = self._value_or_none(obj)
        if isinstance(value, (tuple, list)):
            return len(value)
        return fx.Proxy.__len__(obj)  # torch.fx's own error

    def to_int(self, obj: fx.Proxy) -> int:
        """``int()`` of a number made of shapes: the example's number, with a
        guard that raises for an input that gives another."""
        value = self._value_or_none(obj)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"int() argument must be a string, a bytes-like object or a real number, not 'Proxy' "
                            f"({obj.node.name!r} is no number worked out from shapes alone)")
        self.create_proxy("call_function", check_traced_value, (obj, value, self._where()), {})
        return value

    def _value_or_none(self, obj: fx.Proxy) -> Any:
        try:
            return self._values.of(obj.node) if self._values is not None else None
        except Exception:  # noqa: BLE001  (unknown: the caller raises torch.fx's own error)
            return None

    def _where(self) -> str:
        """The module whose forward is being traced (for the guards' messages)."""
        return next(reversed(self.module_stack), "") if self.module_stack else ""

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ExampleProxy(node, self)

    # ------------------------------------------------------------------ outputs

    def create_arg(self, a: Any) -> Any:
        """A dict subclass that is a dataclass (``transformers``' ``ModelOutput``)
        is rebuilt by calling its class, as torch.fx does for a dataclass,
        instead of flattening into a plain dict (``out.logits`` must work)."""
        if isinstance(a, dict) and type(a) is not dict and dataclasses.is_dataclass(a):
            kwargs = {f.name: self.create_arg(getattr(a, f.name)) for f in dataclasses.fields(a)}
            return self.create_node("call_function", type(a), (), kwargs)
        return super().create_arg(a)


class _ExampleProxy(fx.Proxy):
    """A Proxy whose ``len()`` and ``int()`` the tracer works out on the
    example input (plain torch.fx raises for them). No ``__index__``: torch's
    argument parser would call it on ``torch.full((x.shape[0], 1), ...)``,
    which torch.fx records symbolically, and fix the batch size."""

    def __len__(self) -> int:
        return self.tracer.length(self)  # type: ignore[attr-defined]

    def __int__(self) -> int:
        return self.tracer.to_int(self)  # type: ignore[attr-defined]

    def __getattr__(self, k: str) -> fx.proxy.Attribute:
        return _ExampleAttribute(self, k)  # ``len(x.shape)`` too


class _ExampleAttribute(fx.proxy.Attribute):
    __len__ = _ExampleProxy.__len__
    __int__ = _ExampleProxy.__int__


def is_output_like(node: fx.Node) -> bool:
    """The graph's output, or a container built only for it: a tuple or
    namedtuple, or a dataclass (a ``ModelOutput``) made by calling its class."""
    if node.op == "output":
        return True
    if node.op == "call_function" and isinstance(node.target, type) and (
            issubclass(node.target, tuple) or dataclasses.is_dataclass(node.target)):
        return all(is_output_like(u) for u in node.users)
    return False


# --------------------------------------------------------------------------- the example call


class SlotKind(enum.Enum):
    """What one argument of a traced forward becomes."""

    INPUT = "input"          # a tensor of the example: a placeholder
    FIXED = "fixed"          # a literal (bool, None, int, str...): a keyword with a guard
    CONSTANT = "constant"    # any other value: passed as it is, not an argument of the graph


@dataclass(frozen=True)
class Slot:
    """One argument of the traced call."""

    name: str
    kind: SlotKind
    value: Any                              # the example tensor, or the value it is traced with
    param: inspect.Parameter | None = None  # None for a keyword that lands in ``**kwargs``
    passed: bool = True                     # given by the example call (else: the default)

    @property
    def default(self) -> Any:
        """The graph keyword's default: the forward's own when it has a literal
        one (called without it, the guard compares like the original would),
        else the traced value."""
        if self.param is not None and self.param.default is not self.param.empty and _is_literal(self.param.default):
            return self.param.default
        return self.value


@dataclass(frozen=True)
class ExampleCall:
    """How a module's forward was called on its example, read against its
    signature: which arguments become placeholders and which keep their value.

    The positional example tensors fill the leading parameters (an HF
    ``pixel_values=None`` too); every other parameter keeps its default
    (``labels=None``, ``output_hidden_states=False``, ``mask=None``,
    ``**kwargs`` empty), or the value the example call gave it.
    """

    signature: inspect.Signature
    slots: tuple[Slot, ...]
    has_example: bool

    def arguments(self, values: Mapping[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """The call to make, with ``values`` (proxies, fixed values) by name;
        arguments the example left out are left out (Python gives the default)."""
        bound: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for slot in self.slots:
            if not slot.passed:
                continue
            if slot.param is None:
                extra[slot.name] = values[slot.name]
            else:
                bound[slot.name] = values[slot.name]
        var_kw = next((p.name for p in self.signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
        if var_kw is not None and extra:
            bound[var_kw] = extra
        arguments = inspect.BoundArguments(self.signature, bound)  # type: ignore[arg-type]
        return arguments.args, arguments.kwargs


_LITERALS = (bool, int, float, str, type(None))


def _is_literal(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_is_literal(v) for v in value)
    return type(value) in _LITERALS


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_holds_tensor(v) for v in value)
    if isinstance(value, Mapping):
        return any(_holds_tensor(v) for v in value.values())
    return False


def example_call(module: nn.Module, args: Sequence[Any] | None = None,
                 kwargs: Mapping[str, Any] | None = None) -> ExampleCall | None:
    """Read a call ``module(*args, **kwargs)`` against its forward's signature;
    None when it cannot be read (plain torch.fx then traces every parameter).

    Without ``args``, the leading parameters up to the last one without a
    default (at least one) are the inputs.
    """
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return None
    params = list(signature.parameters.values())
    has_example = args is not None
    if args is None:
        named = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        required = [i for i, p in enumerate(named) if p.default is p.empty]
        count = max(1, required[-1] + 1 if required else 0) if named else 0
        args = [_NO_EXAMPLE] * count
    try:
        bound = signature.bind_partial(*args, **dict(kwargs or {}))
    except TypeError:
        return None
    slots: list[Slot] = []
    for p in params:
        if p.kind is p.VAR_POSITIONAL:
            if bound.arguments.get(p.name):
                return None  # example tensors in *args: plain torch.fx
            continue
        if p.kind is p.VAR_KEYWORD:
            for key, value in bound.arguments.get(p.name, {}).items():
                slots.append(_slot(key, value, None, True))
            continue
        if p.name in bound.arguments:
            slots.append(_slot(p.name, bound.arguments[p.name], p, True))
        elif p.default is not p.empty:
            if _is_literal(p.default):
                slots.append(Slot(p.name, SlotKind.FIXED, p.default, p, passed=False))
        else:
            return None  # a required argument the example does not give: plain torch.fx
    if not any(slot.kind is SlotKind.INPUT for slot in slots):
        return None  # nothing to trace with (forward(*args) and no example): plain torch.fx
    return ExampleCall(signature, tuple(slots), has_example)


class _NoExample:
    """An input tensor whose example is not known (no shape specialization)."""


_NO_EXAMPLE = _NoExample()


def _slot(name: str, value: Any, param: inspect.Parameter | None, passed: bool) -> Slot:
    if isinstance(value, (torch.Tensor, _NoExample)):
        return Slot(name, SlotKind.INPUT, value, param, passed)
    if _is_literal(value):
        return Slot(name, SlotKind.FIXED, value, param, passed)
    if _holds_tensor(value):  # a container of tensors: one placeholder, as plain torch.fx would make
        return Slot(name, SlotKind.INPUT, value, param, passed)
    return Slot(name, SlotKind.CONSTANT, value, param, passed)


def _guard(check: Callable[..., None]) -> Callable[..., Any]:
    """A guard of the traced graphs: kept by dead-code elimination, and
    recorded again (not run) when a rewritten model is traced again."""

    @functools.wraps(check)
    def guard(value: Any, *rest: Any) -> Any:
        if isinstance(value, fx.Proxy):
            return value.tracer.create_proxy("call_function", guard, (value, *rest), {})
        return check(value, *rest)

    fx.node._side_effectful_functions.add(guard)
    return guard


@_guard
def check_traced_argument(value: Any, traced: Any, name: str) -> None:
    """The guard of a keyword fixed at tracing: the graph holds the branches
    its traced value took, and no other value can run through it."""
    if value is traced or (not isinstance(value, torch.Tensor) and type(value) is type(traced) and value == traced):
        return
    raise UsageError(f"this model was rewritten with {name}={traced!r} and computes only that; it was called "
                     f"with {name}={_brief(value)}: give {name}={traced!r}, or rewrite the original model for the "
                     "call you need")


@_guard
def check_traced_branch(condition: Any, taken: bool, where: str) -> None:
    """The guard of a branch on shapes: the graph holds the branch the
    example input took; an input whose shapes take the other one is refused."""
    if bool(condition) != taken:
        raise ExampleInputError(
            f"{where or 'the model'}: this input's shapes take another branch of its forward than the example "
            "input it was rewritten with; rewrite it with an example input of this shape")


@_guard
def check_traced_value(value: Any, traced: int, where: str) -> None:
    """The guard of a shape turned into a Python number: the graph holds
    the example's number; an input that gives another is refused."""
    if int(value) != traced:
        raise ExampleInputError(
            f"{where or 'the model'}: its forward turns a shape into a number, {traced} on the example input it "
            f"was rewritten with and {int(value)} on this one; rewrite it with an example input of this shape")


def _brief(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return repr(value)[:80]


class _ExampleValues:
    """Values of the nodes traced so far, computed on meta copies of the
    example (no arithmetic); shapes, dims and Python values come out exact,
    tensor data stays unknown (a meta tensor), so data-dependent control flow
    stays untraceable."""

    def __init__(self, root: nn.Module, examples: Mapping[fx.Node, Any]) -> None:
        self.root = root
        self.env: dict[fx.Node, Any] = {n: _to_meta(v) for n, v in examples.items()}
        self._state: dict[str, torch.Tensor] = {}
        self._runner: fx.Interpreter | None = None

    def of(self, node: fx.Node) -> Any:
        """The value of ``node``, running the nodes before it not run yet."""
        if node in self.env:
            return self.env[node]
        from torch.fx import _symbolic_trace  # noqa: PLC0415
        from torch.nn.utils.stateless import _reparametrize_module  # noqa: PLC0415

        # the modules run below must not go through the tracer's patched Module.__call__ and __getattr__
        unpatched = getattr(_symbolic_trace, "_maybe_revert_all_patches", contextlib.nullcontext)

        if self._runner is None:
            self._state = _meta_state(self.root)
            self._runner = fx.Interpreter(self.root, garbage_collect_values=False, graph=node.graph)
            self._runner.env = self.env
        runner = self._runner
        with unpatched(), torch.no_grad(), _reparametrize_module(self.root, self._state):
            for n in node.graph.nodes:
                if n in self.env:
                    continue
                if n.op == "placeholder":
                    self.env[n] = n.args[0] if n.args else None
                    continue
                self.env[n] = _to_meta(runner.run_node(n))
                if n is node:
                    break
        return self.env[node]


def _meta_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: torch.empty_like(t, device="meta")
            for name, t in [*module.named_parameters(remove_duplicate=False),
                            *module.named_buffers(remove_duplicate=False)]}


# --------------------------------------------------------------------------- trace


def trace(module: nn.Module, leaf_modules: tuple[type[nn.Module], ...] = (), args: Sequence[Any] | None = None,
          kwargs: Mapping[str, Any] | None = None) -> fx.GraphModule:
    """Trace ``module`` in the train/eval mode it is in, keeping instances of
    ``leaf_modules`` as one call each, for the call ``module(*args, **kwargs)``.

    What plain ``torch.fx.symbolic_trace`` cannot, and this does:

    * only the example's tensors become placeholders; every other parameter
      of the forward keeps its default or the value the call gave it
      (``output_hidden_states: bool = False``, ``mask=None``, ``**kwargs``),
      as ``concrete_args`` would, also through decorated forwards. A literal
      value stays a keyword of the graph, guarded: calling the rewritten model
      with another value raises instead of computing something else;
    * ``if x.shape[1] != self.num_channels: raise`` and other branches on
      shapes follow the example input (values worked out on meta tensors),
      and the graph gets a guard that raises for an input whose shapes would
      branch the other way; so does ``int()`` of a number made of shapes
      (TF-style "same" padding); ``len()`` of a shape counts its dimensions.
      Shapes used as values stay symbolic, so the graph still runs at other
      batch and spatial sizes. A branch on tensor data stays untraceable;
    * a ``ModelOutput`` (a dict that is a dataclass) is rebuilt as it was;
    * no Proxy is left in a module's state (a cache of the forward, like
      LeViT's attention biases), where a later trace would read it back.

    Raises :class:`TraceError` with torch.fx's reason when it cannot be traced.
    """
    if isinstance(module, fx.GraphModule):
        # Already a graph: reuse it (a second rewrite of a rewritten model).
        return fx.GraphModule(module, module.graph.__deepcopy__(), class_name=module.__class__.__name__)
    leaves, funcs = _timm_leaf_modules()
    tracer = ConvifyTracer(tuple(leaf_modules) + leaves, funcs, example_call(module, args, kwargs))
    state = _module_state(module)
    try:
        graph = tracer.trace(module)
    except Exception as e:  # FX raises anything: TraceError, TypeError, AssertionError...
        raise TraceError(f"torch.fx cannot trace {type(module).__name__}: {one_line(e)}") from e
    finally:
        _restore_module_state(module, state)
        tracer._values = None
    name = module.__class__.__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.training = module.training
    return gm


# --------------------------------------------------------------------------- module state

_REGISTRIES = frozenset({"_parameters", "_buffers", "_modules"})


def _module_state(root: nn.Module) -> dict[int, tuple[nn.Module, dict[str, Any]]]:
    """Every module's plain attributes, with a shallow copy of each dict or
    list (a cache a forward may fill)."""
    return {id(m): (m, {k: (v, _shallow(v)) for k, v in vars(m).items() if k not in _REGISTRIES})
            for m in root.modules()}


def _shallow(value: Any) -> Any:
    return copy.copy(value) if type(value) in (dict, list) else None


def _holds_proxy(value: Any) -> bool:
    if isinstance(value, fx.Proxy):
        return True
    if isinstance(value, dict):
        return any(isinstance(v, fx.Proxy) or isinstance(k, fx.Proxy) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(isinstance(v, fx.Proxy) for v in value)
    return False


def _restore_module_state(root: nn.Module, state: dict[int, tuple[nn.Module, dict[str, Any]]]) -> None:
    """Undo what a trace left in module attributes that holds a Proxy
    (LeViT's ``attention_bias_cache[str(proxy.device)] = proxy``): the attribute
    and its dict or list get their content from before the trace back."""
    for m in root.modules():
        before = state.get(id(m), (m, {}))[1]
        for key, value in list(vars(m).items()):
            if key in _REGISTRIES or not _holds_proxy(value):
                continue
            if key not in before:
                delattr(m, key)
                continue
            old, content = before[key]
            if content is not None and type(old) is type(content):
                if isinstance(old, dict):
                    old.clear()
                    old.update(content)
                else:
                    old[:] = content
            vars(m)[key] = old


def copy_module(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, also when a forward outside ``no_grad`` left
    a non-leaf tensor in a module attribute (a cache, like LeViT's attention
    biases), which deepcopy refuses: such a tensor is copied as its value."""
    memo: dict[int, Any] = {}
    for m in model.modules():
        for value in vars(m).values():
            for t in _tensors_one_level(value):
                if t.grad_fn is not None and id(t) not in memo:
                    memo[id(t)] = t.detach().clone()
    return copy.deepcopy(model, memo)


def _tensors_one_level(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        yield from (v for v in value.values() if isinstance(v, torch.Tensor))
    elif isinstance(value, (list, tuple)):
        yield from (v for v in value if isinstance(v, torch.Tensor))


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
    if isinstance(value, torch.Tensor):
        return value.to("meta")
    if isinstance(value, (tuple, list, dict)):
        return pytree.tree_map(lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v, value)
    return value


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


#: ``node.meta`` key of a placeholder whose tensor was reduced to one value
#: per channel outside the graph: what reduced it (``"features.pool (AdaptiveAvgPool2d)"``).
REDUCED_BY = "convify_reduced_by"


def reduces_space(before: Any, after: Any, same_channels: bool = True) -> bool:
    """Whether ``after`` is ``before`` (N, C, *S) reduced to one value per
    channel over more than one position: (N, C) or (N, C, 1, ...); with
    ``same_channels=False`` (a module that may convolve first) any C."""
    return (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)
            and _reduced_shapes(tuple(before.shape), tuple(after.shape), same_channels))


def reduced_by(node: fx.Node) -> str | None:
    """What reduced the map at ``node`` to one value per channel where this
    graph cannot see it: untraced code before the graph begins (the engine's
    fallback marks such placeholders), or a module torch.fx did not enter.
    Walks back through ops that keep their input's shape. None when the
    reduction, if any, is in the graph."""
    cur = node
    while True:
        if cur.op == "placeholder":
            return cur.meta.get(REDUCED_BY)
        inputs = cur.all_input_nodes
        found = info(cur)
        if cur.op == "call_module" and len(inputs) >= 1:
            before = info(inputs[0])
            if found is not None and before is not None and _reduced_shapes(before.shape, found.shape, False):
                module = cur.graph.owning_module.get_submodule(cur.target) if cur.graph.owning_module else None
                kind = type(module).__name__ if module is not None else "module"
                return f"{cur.target} ({kind}), a module torch.fx does not enter"
        if len(inputs) != 1 or found is None or info(inputs[0]) is None or info(inputs[0]).shape != found.shape:
            return None
        cur = inputs[0]


def _reduced_shapes(before: tuple[int, ...], after: tuple[int, ...], same_channels: bool = True) -> bool:
    kept = tuple(after[:2]) == tuple(before[:2]) if same_channels else after[:1] == before[:1]
    return (len(before) >= 3 and len(after) >= 2 and kept
            and math.prod(before[2:]) > 1 and all(s == 1 for s in after[2:]))


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
