"""What ``init="avg"`` promises, computed independently of the rewrite.

``avg_reference(model, x)`` runs the *original* model with every max pooling
computed as average pooling over the same window (zeros for ceil_mode's extra
right/bottom windows). It intercepts at the function level, so functional
calls inside library blocks (inception's ``F.max_pool2d``) are caught too, and
it never looks at the FX graph: a rewrite with ``init="avg"`` must match it.

>>> rewritten = convify.replace_maxpool(model)
>>> ref, pools = avg_reference(model, x)
>>> torch.allclose(rewritten(x), ref, atol=1e-5)
True
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from convify.core.weights import ceil_mode_extra_pad, ntuple
from convify.fx import ops

_NAMES = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")


class MaxAsAvg(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in ops.VALUE_MAX_POOL_FUNCTIONS:
            return func(*args, **kwargs)
        self.count += 1
        dims = ops.VALUE_MAX_POOL_FUNCTIONS[func]
        a = dict(zip(_NAMES, args)) | kwargs
        k = ntuple(a["kernel_size"], dims)
        s = a.get("stride")
        s = k if s is None or (isinstance(s, (list, tuple)) and not s) else ntuple(s, dims)
        p = ntuple(a.get("padding", 0), dims)
        d = ntuple(a.get("dilation", 1), dims)
        if any(v != 1 for v in d):
            raise NotImplementedError("average pooling has no dilation: no reference for dilated max pooling")
        extra = [ceil_mode_extra_pad(*t) if a.get("ceil_mode") else 0 for t in zip(k, s, p, d)]
        pad = tuple(v for pi, e in zip(reversed(p), reversed(extra)) for v in (pi, pi + e))
        return ops.AVG_POOL_FUNCTIONS[dims](F.pad(a["input"], pad), k, s, 0)


def avg_reference(model: torch.nn.Module, *inputs: torch.Tensor) -> tuple[Any, int]:
    """The model's output with max pooling computed as average pooling, and
    how many max poolings ran."""
    mode = MaxAsAvg()
    with torch.no_grad(), mode:
        out = model(*inputs)
    return out, mode.count
