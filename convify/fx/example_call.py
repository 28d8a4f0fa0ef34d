"""How a forward is called: the example tensors and the other arguments, bound to its signature."""
from __future__ import annotations

import enum
import inspect
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

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


