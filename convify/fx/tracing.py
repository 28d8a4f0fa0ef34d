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
import dataclasses
import functools
import operator
import sys
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from convify.errors import ExampleInputError, TraceError, UsageError, one_line
from convify.fx.copying import module_state, restore_module_state
from convify.fx.example_call import ExampleCall, SlotKind, example_call
from convify.fx.shapes import to_meta

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


#: Every guard of the traced graphs, with its plain form: a function that
#: inserts, before the guard's node, the same check made of torch and Python
#: calls only (``torch._assert`` of a condition). A whole pickled model gets the
#: plain forms (:mod:`convify.fx.portable`), so that loading it needs no convify.
GUARDS: dict[Callable[..., Any], Callable[[fx.Graph, fx.Node], None]] = {}


def guard(plain: Callable[[fx.Graph, fx.Node], None]) -> Callable[[Callable[..., None]], Callable[..., Any]]:
    """Make ``check`` a guard of the traced graphs: kept by dead-code
    elimination, recorded again (not run) when a rewritten model is traced
    again, and written as ``plain`` into a whole pickled model."""

    def make(check: Callable[..., None]) -> Callable[..., Any]:
        @functools.wraps(check)
        def guarded(value: Any, *rest: Any) -> Any:
            if isinstance(value, fx.Proxy):
                return value.tracer.create_proxy("call_function", guarded, (value, *rest), {})
            return check(value, *rest)

        fx.node._side_effectful_functions.add(guarded)
        GUARDS[guarded] = plain
        return guarded

    return make


def plain_assert(graph: fx.Graph, condition: Any, message: str) -> fx.Node:
    """``torch._assert(condition, message)``: a guard's plain form (an
    ``AssertionError`` with the guard's message)."""
    return graph.call_function(torch._assert, (condition, message))


def _argument_message(name: str, traced: Any, value: str) -> str:
    return (f"this model was rewritten with {name}={traced!r} and computes only that; it was called "
            f"with {name}={value}: give {name}={traced!r}, or rewrite the original model for the call you need")


def _plain_argument(graph: fx.Graph, node: fx.Node) -> None:
    # ``==``, not ``is``: unpickling re-traces the code, and torch.fx records ``==`` but evaluates ``is``
    value, traced, name = node.args
    same = graph.call_function(operator.eq, (value, traced))
    plain_assert(graph, same, _argument_message(name, traced, "another value"))


@guard(_plain_argument)
def check_traced_argument(value: Any, traced: Any, name: str) -> None:
    """The guard of a keyword fixed at tracing: the graph holds the branches
    its traced value took, and no other value can run through it."""
    if value is traced or (not isinstance(value, torch.Tensor) and type(value) is type(traced) and value == traced):
        return
    raise UsageError(_argument_message(name, traced, _brief(value)))


def _branch_message(where: str) -> str:
    return (f"{where or 'the model'}: this input's shapes take another branch of its forward than the example "
            "input it was rewritten with; rewrite it with an example input of this shape")


def _plain_branch(graph: fx.Graph, node: fx.Node) -> None:
    condition, taken, where = node.args
    held = graph.call_function(operator.eq, (condition, taken))  # ``not`` would need a bool while re-tracing
    plain_assert(graph, held, _branch_message(where))


@guard(_plain_branch)
def check_traced_branch(condition: Any, taken: bool, where: str) -> None:
    """The guard of a branch on shapes: the graph holds the branch the
    example input took; an input whose shapes take the other one is refused."""
    if bool(condition) != taken:
        raise ExampleInputError(_branch_message(where))


def _value_message(where: str, traced: int, value: str) -> str:
    return (f"{where or 'the model'}: its forward turns a shape into a number, {traced} on the example input it "
            f"was rewritten with and {value} on this one; rewrite it with an example input of this shape")


def _plain_value(graph: fx.Graph, node: fx.Node) -> None:
    value, traced, where = node.args
    plain_assert(graph, graph.call_function(operator.eq, (value, traced)), _value_message(where, traced, "another"))


@guard(_plain_value)
def check_traced_value(value: Any, traced: int, where: str) -> None:
    """The guard of a shape turned into a Python number: the graph holds
    the example's number; an input that gives another is refused."""
    if int(value) != traced:
        raise ExampleInputError(_value_message(where, traced, str(int(value))))


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
        self.env: dict[fx.Node, Any] = {n: to_meta(v) for n, v in examples.items()}
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
                self.env[n] = to_meta(runner.run_node(n))
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
    state = module_state(module)
    try:
        graph = tracer.trace(module)
    except Exception as e:  # FX raises anything: TraceError, TypeError, AssertionError...
        raise TraceError(f"torch.fx cannot trace {type(module).__name__}: {one_line(e)}") from e
    finally:
        restore_module_state(module, state)
        tracer._values = None
    if not rebuilds_dict_outputs(graph):
        graph._tracer_cls = None  # a pickle of the GraphModule then names torch.fx's own tracer, not convify's
    name = module.__class__.__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.training = module.training
    return gm




def rebuilds_dict_outputs(graph: fx.Graph) -> bool:
    """Whether ``graph`` rebuilds a dict that is a dataclass (a ``ModelOutput``):
    unpickling re-traces the code, and only :class:`ConvifyTracer` keeps such
    a dict what it is, so its GraphModule keeps naming that tracer."""
    return any(n.op == "call_function" and isinstance(n.target, type) and issubclass(n.target, dict)
               for n in graph.nodes)
