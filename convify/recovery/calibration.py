"""Calibration data as the rewrites and recovery read it: a re-iterable sequence of batches, one batch run
through a model (stopped early once a hook has what it needs), and the pooling sites a report's records
name, in the order a batch reaches them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn

from convify.core.report import Pass, Replaced
from convify.core.rewrites.maxpool import PoolParams, PoolRecord
from convify.errors import ExampleInputError, RewriteError, UsageError, one_line
from convify.fx import copying
from convify.fx.inputs import to_model


def calibration_batches(calibration: Iterable[Any], who: str) -> Sequence[Any]:
    """Calibration data as a re-iterable sequence of batches (a one-shot
    iterator is read into a list; a tensor is one batch)."""
    if isinstance(calibration, torch.Tensor):
        return [calibration]
    if iter(calibration) is calibration:  # type: ignore[arg-type]
        calibration = list(calibration)
    if next(iter(calibration), None) is None:
        raise UsageError(f"{who}: calibration= yielded no batches; pass at least one input batch")
    return calibration  # type: ignore[return-value]


def first_input(batch: Any) -> torch.Tensor | None:
    """One sample of a calibration batch (a tensor or an (input, label) pair)."""
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    return batch[:1] if isinstance(batch, torch.Tensor) else None


def batch_input(batch: Any) -> torch.Tensor:
    """The input of a calibration batch: the batch itself, or the first element of an (input, label) pair."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise ExampleInputError(f"init='fit': a calibration batch must be a tensor or an (input, label) pair, "
                            f"not {type(batch).__name__}")


class Enough(Exception):
    """Raised inside a forward once everything needed from it is recorded."""


def run_batch(model: nn.Module, batch: Any, who: str = "init='fit'") -> None:
    """Run ``model`` on a calibration batch (a hook may stop it early with :class:`Enough`); ``who`` names the
    caller in the error of a batch that does not run."""
    x = to_model(model, batch_input(batch))
    try:
        model(x)
    except Enough:
        return
    except Exception as e:
        raise ExampleInputError(f"{who}: a calibration batch of shape {tuple(x.shape)} does not run "
                                f"through the model: {one_line(e)}") from e


# --------------------------------------------------------------------------- pooling sites


@dataclass
class PoolSite:
    """One new convolution to fit (or reconstruct): its report row, the pooling it replaced, the module."""

    row: Replaced
    params: PoolParams
    conv: nn.modules.conv._ConvNd


def pool_sites(model: nn.Module, done: Pass) -> list[PoolSite]:
    """The sites of a pass whose pooling became one new convolution
    (``PoolRecord.conv``; a fold adds none), read from the rows' typed records."""
    return [PoolSite(row, row.detail.params, _conv_at(model, row, row.detail.conv)) for row in done.replaced
            if isinstance(row.detail, PoolRecord) and row.detail.conv is not None]


def _conv_at(model: nn.Module, row: Replaced, name: str) -> nn.modules.conv._ConvNd:
    try:
        conv = model.get_submodule(name)
    except AttributeError as e:
        raise RewriteError(f"init='fit': site {row.name!r} names module {name!r}, which the rewritten "
                           "model does not have; please report this as a convify bug") from e
    if not isinstance(conv, nn.modules.conv._ConvNd):
        raise RewriteError(f"init='fit': module {name!r} of site {row.name!r} is a "
                           f"{type(conv).__name__}, not a convolution")
    return conv


def in_forward_order(model: nn.Module, sites: list[PoolSite], batches: Sequence[Any],
                     who: str = "init='fit'") -> list[PoolSite]:
    """Sites sorted by when the forward first calls them (one batch, no grad); ``who`` as in :func:`run_batch`."""
    if len(sites) < 2:
        return sites
    order: dict[int, int] = {}

    def first_call(i: int):  # noqa: ANN202
        def hook(_m: nn.Module, _args: tuple) -> None:
            order.setdefault(i, len(order))
        return hook

    handles = [s.conv.register_forward_pre_hook(first_call(i)) for i, s in enumerate(sites)]
    try:
        with torch.no_grad(), copying.eval_mode(model):
            run_batch(model, next(iter(batches)), who)
    finally:
        for h in handles:
            h.remove()
    return [sites[i] for i in sorted(range(len(sites)), key=lambda i: order.get(i, len(sites) + i))]
