"""BatchNorm re-estimation for reconstruction: a BatchNorm's running statistics moved so that it normalizes
its drifted input as the original normalized its own, per channel."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from convify.fx import copying, ops
from convify.recovery.calibration import Enough, run_batch


def reestimate_batchnorms(original: nn.Module, model: nn.Module, names: Sequence[str],
                          batches: Sequence[Any]) -> list[str]:
    """Re-estimate each BatchNorm's running statistics for its drifted input, in forward order.

    Per channel, the rewritten input ``r`` is regressed on the original's
    input ``o`` over the calibration data (``o ~ a r + b``, least squares);
    the statistics become those that normalize ``r`` as the original's
    normalized ``a r + b``: ``mean' = (mean - b) / a``, ``var' + eps = (var +
    eps) / a^2``. An unchanged input gives ``a = 1, b = 0``: the statistics stay
    exactly as they were. Where the two are not positively correlated
    (``a <= 0``), only the means are matched (``a = 1``).
    """
    moved = []
    for name in names:
        try:
            reference = original.get_submodule(name)
        except AttributeError:
            continue
        bn = model.get_submodule(name)
        if not isinstance(reference, ops.BATCH_NORM) or bn.running_mean is None or reference.running_mean is None:
            continue
        sums = None
        for batch in batches:
            o, r = _bn_input(original, reference, batch), _bn_input(model, bn, batch)
            if o is None or r is None or o.shape != r.shape:
                sums = None
                break
            moments = torch.stack([r.sum(1), o.sum(1), (r * r).sum(1), (r * o).sum(1)])
            sums = (moments, o.shape[1]) if sums is None else (sums[0] + moments, sums[1] + o.shape[1])
        if sums is None:
            continue
        sr, so, srr, sro = sums[0] / sums[1]
        var_r, cov = srr - sr * sr, sro - sr * so
        slope = torch.where((var_r > 1e-12) & (cov > 0), cov / var_r.clamp_min(1e-12), torch.ones_like(cov))
        offset = so - slope * sr
        with torch.no_grad():
            mean, var = bn.running_mean.double(), bn.running_var.double()
            bn.running_mean.copy_(((mean - offset) / slope).to(bn.running_mean))
            bn.running_var.copy_(((var + bn.eps) / slope.pow(2) - bn.eps).clamp_min(0).to(bn.running_var))
        moved.append(name)
    return moved


def _bn_input(model: nn.Module, bn: nn.Module, batch: Any) -> torch.Tensor | None:
    """The input of ``bn``'s first call on ``batch``, as ``(C, N*H*W)`` float64."""
    seen: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple) -> None:
        seen.append(args[0].detach())
        raise Enough

    handle = bn.register_forward_pre_hook(hook)
    try:
        with torch.no_grad(), copying.eval_mode(model):
            run_batch(model, batch, "reconstruct")
    finally:
        handle.remove()
    if not seen:
        return None
    x = seen[0]
    return x.double().transpose(0, 1).reshape(x.shape[1], -1)
