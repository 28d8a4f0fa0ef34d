"""``init="fit"`` for global-average heads: the least-squares fit of the first 1x1 convolution of every
``gap`` or ``gap_mlp`` head (:class:`HeadRecord`) that is not exact, toward the original model's outputs."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
import torch.nn as nn

from convify.core.metrics import top1, top1_agreement
from convify.core.report import Fit, Pass
from convify.core.rewrites.head import HeadRecord
from convify.fx import copying
from convify.recovery.calibration import run_batch
from convify.recovery.least_squares import NormalEquations, solve_and_install, weights_as_matrix, with_fit
from convify.wording import counted


def fit_gap_heads(teacher: nn.Module | None, model: nn.Module, done: Pass, batches: Sequence[Any]) -> Pass:
    """Least-squares fit of the first 1x1 convolution of every ``gap`` or
    ``gap_mlp`` head of ``done`` that is not exact, in place; returns the pass
    with each fitted row's ``fit`` set.

    Global average pooling commutes with the 1x1 convolution, so the head's
    first layer computes ``W @ mean_hw(x) + b``: a ``(C + 1)``-feature least
    squares on the pooled features of the map the convolution reads, ridge
    toward its data-free init. The target comes from ``teacher`` on the same
    batch (so it also absorbs an earlier pooling rewrite's drift):

    * ``gap``, the paper's head (:attr:`HeadRecord.collapsed`): the original
      logits, the output of the head's last Linear; the fit's top-1
      agreement with the original on the calibration data goes in the report;
    * ``gap_mlp``: the output of the first Linear (the MLP after it is kept).

    On spatially stationary inputs the data-free init is already about
    optimal; the fit gains where the maps have spatial structure (centred
    objects, as in real images) and, for ``gap``, where the MLP's activations
    are far from identities.

    >>> allconv = convify.convify(vgg, x, head="gap", init="fit", calibration=batches)
    """
    if teacher is None:
        return dataclasses.replace(done, notes=done.notes + (
            "init=fit skipped for the gap heads: no original model to take the targets from",))
    rows = tuple(with_fit(row, _fit_gap_row(teacher, model, row.detail, batches))
                 if not row.exact and isinstance(row.detail, HeadRecord) else row for row in done.replaced)
    return dataclasses.replace(done, replaced=rows)


def _fit_gap_row(original: nn.Module, rewritten: nn.Module, record: HeadRecord, batches: Sequence[Any]) -> Fit | str:
    try:
        linear = original.get_submodule(record.logits_from)
        conv = rewritten.get_submodule(record.linears[0])
    except AttributeError:
        return "init=fit skipped: the head's Linear or its new convolution could not be found by name"
    if not isinstance(linear, nn.Linear) or not isinstance(conv, nn.modules.conv._ConvNd):
        return "init=fit skipped: expected a Linear replaced by a 1x1 convolution"
    normal = NormalEquations()
    pooled: list[torch.Tensor] = []
    classes: list[torch.Tensor] = []
    for batch in batches:
        targets, inputs = _capture(original, linear, batch, "output"), _capture(rewritten, conv, batch, "input")
        if len(targets) != len(inputs):
            return (f"init=fit skipped: the Linear ran {counted(len(targets), 'time')}, its convolution "
                    f"{counted(len(inputs), 'time')}")
        for y, x in zip(targets, inputs):
            feats = x.flatten(2).mean(-1).double()
            feats = torch.cat([feats, torch.ones(len(feats), 1, dtype=feats.dtype, device=feats.device)], 1)
            y = y.double().reshape(len(feats), -1)
            normal.add(feats.T @ feats, feats.T @ y, (y ** 2).sum(), len(feats))
            if record.collapsed:
                pooled.append(feats)
                classes.append(top1(y))
    if normal.gram is None:
        return "init=fit skipped: the calibration batches never reached this head"
    if not record.collapsed:
        return solve_and_install(conv, normal, False, start="summed-weight init", toward="the first Linear's output")
    prior = weights_as_matrix(conv, False, normal.gram.dtype, normal.gram.device)
    fit = solve_and_install(conv, normal, False, start="product init", toward="the original's logits")
    solution = weights_as_matrix(conv, False, normal.gram.dtype, normal.gram.device)
    feats, want = torch.cat(pooled), torch.cat(classes)
    return dataclasses.replace(fit, agreement=top1_agreement(feats @ solution, want),
                               agreement_before=top1_agreement(feats @ prior, want))


def _capture(model: nn.Module, module: nn.Module, batch: Any, what: str) -> list[torch.Tensor]:
    """The ``"input"`` or ``"output"`` of every call of ``module`` when ``model`` runs on ``batch``."""
    seen: list[torch.Tensor] = []
    if what == "input":
        handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()) and None)
    else:
        handle = module.register_forward_hook(lambda _m, _a, out: seen.append(out.detach()) and None)
    try:
        with torch.no_grad(), copying.eval_mode(model):
            run_batch(model, batch)
    finally:
        handle.remove()
    return seen

