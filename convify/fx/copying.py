"""Copying modules for a rewrite and running them in eval mode, restoring every flag."""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator

import torch
import torch.fx as fx
import torch.nn as nn

# --------------------------------------------------------------------------- module state

_REGISTRIES = frozenset({"_parameters", "_buffers", "_modules"})


def module_state(root: nn.Module) -> dict[int, tuple[nn.Module, dict[str, Any]]]:
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


def restore_module_state(root: nn.Module, state: dict[int, tuple[nn.Module, dict[str, Any]]]) -> None:
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


