"""State dicts as training scripts save them: unwrapped, prefixes stripped,
compared with what a model expects, loaded with every mismatch named.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn as nn

from convify.errors import CheckpointError, one_line
from convify.io.files import LISTED, listing

# Keys under which training scripts nest the state_dict, most specific first.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")
# Prefixes added by DataParallel/DDP ("module.") and torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

def _is_tensor_dict(obj: Any) -> bool:
    if not isinstance(obj, Mapping) or not obj:
        return False
    return all(isinstance(k, str) for k in obj) and all(
        isinstance(v, torch.Tensor) or k.endswith("_extra_state") for k, v in obj.items())


def unwrap(obj: Any, path: str | os.PathLike[str] = "<object>") -> dict[str, torch.Tensor] | nn.Module:
    """The state_dict (or module) inside what ``torch.load`` returned:
    ``{"state_dict": ...}``, ``{"model": ...}`` and the like are opened, the
    ``module.`` prefix of DataParallel/DDP and ``_orig_mod.`` of torch.compile
    are removed.

    >>> unwrap({"epoch": 3, "state_dict": {"module.fc.weight": w}})
    {'fc.weight': w}
    """
    for _ in range(4):  # wrappers nest a few levels at most
        if isinstance(obj, nn.Module) or _is_tensor_dict(obj):
            break
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state_dict or a model")
        inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj), None)
        if inner is None:
            keys = [str(k) for k in list(obj)[:LISTED]]
            raise CheckpointError(f"{path} holds a dict with keys {keys} and no state_dict in it "
                                  f"(looked under {', '.join(_WRAPPER_KEYS)} and for a dict of tensors)")
        obj = inner
    if isinstance(obj, torch.jit.ScriptModule):
        raise CheckpointError(f"{path} holds a TorchScript module: torch.fx cannot trace it")
    if isinstance(obj, nn.Module):
        return obj
    if not _is_tensor_dict(obj):
        raise CheckpointError(f"{path} holds no state_dict (a dict of tensors) nor a model")
    return strip_prefixes(dict(obj))


def strip_prefixes(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Remove ``module.`` / ``_orig_mod.`` where every key has it."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if state_dict and all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
                changed = True
    return state_dict


@dataclass(frozen=True)
class KeyMismatch:
    """How a state_dict differs from the one a model expects."""

    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    shapes: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()  # key, in file, in model

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.shapes)

    def describe(self) -> str:
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing ({listing(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected ({listing(self.unexpected)})")
        if self.shapes:
            shown = [f"{k} {list(a)} in file vs {list(b)} in model" for k, a, b in self.shapes]
            parts.append(f"{len(self.shapes)} of another shape ({listing(shown, 4)})")
        return "; ".join(parts)


def compare_keys(model: nn.Module, state_dict: Mapping[str, Any]) -> KeyMismatch:
    """Missing, unexpected and differently shaped keys of ``state_dict`` for ``model``.

    A missing ``num_batches_tracked`` (older checkpoints lack it) is not counted.
    """
    expected = model.state_dict()
    missing = tuple(k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked"))
    unexpected = tuple(k for k in state_dict if k not in expected)
    shapes = tuple(
        (k, tuple(v.shape), tuple(expected[k].shape)) for k, v in state_dict.items()
        if k in expected and isinstance(v, torch.Tensor) and isinstance(expected[k], torch.Tensor)
        and tuple(v.shape) != tuple(expected[k].shape))
    return KeyMismatch(missing, unexpected, shapes)


def load_weights(model: nn.Module, state_dict: Mapping[str, Any], *, source: str, target: str) -> None:
    """Load ``state_dict`` into ``model``, or raise listing every mismatch.

    When every key carries one extra leading component (Lightning's ``model.``)
    and dropping it makes the keys fit, it is dropped.
    """
    mismatch = compare_keys(model, state_dict)
    if mismatch:
        stripped = _strip_common_component(state_dict)
        if stripped is not None and not compare_keys(model, stripped):
            state_dict, mismatch = stripped, KeyMismatch()
    if mismatch:
        hint = " (other builder arguments? see {arch_kwargs})" if mismatch.shapes else ""
        raise CheckpointError(f"the weights in {source} do not fit {target}: {mismatch.describe()}{hint}")
    try:
        model.load_state_dict(dict(state_dict), strict=False)
    except Exception as e:
        raise CheckpointError(f"loading the weights in {source} into {target} failed: {one_line(e)}") from e


def _strip_common_component(state_dict: Mapping[str, Any]) -> dict[str, Any] | None:
    firsts = {k.split(".", 1)[0] for k in state_dict}
    if len(firsts) != 1 or not all("." in k for k in state_dict):
        return None
    return {k.split(".", 1)[1]: v for k, v in state_dict.items()}


