"""One pass of one rewrite over a model: the rewrite (the frontend's), then
calibration of its new weights when the options ask for it (recovery's), then
the pass joins the model's report: the one place a report grows. The entry
points (:mod:`convify.api`) and checkpoint rebuilds (:mod:`convify.io`) call it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch.nn as nn

from convify.core.options import RewriteOptions
from convify.core.report import attach, report
from convify.errors import UsageError, one_line
from convify.fx import copying
from convify.fx.engine import copy_model, rewrite_model
from convify.fx.rewrites.base import Rewrite
from convify.recovery.calibration import calibration_batches, first_input
from convify.recovery.fit import calibrate_pass
from convify.recovery.synthetic import synthetic_calibration


class _Same:
    """The default of ``run_pass(teacher=)``: the model being rewritten."""


SAME = _Same()


def run_pass(model: nn.Module, rewrite: Rewrite, example_input: Any = None, *,
             only: str | Sequence[str] | None = None, skip: str | Sequence[str] | None = None,
             inplace: bool = False, calibration: Iterable[Any] | str | None = None,
             teacher: nn.Module | None | _Same = SAME, rebuilt_from: RewriteOptions | None = None,
             fit_target: str = "original") -> nn.Module:
    """Rewrite ``model``, calibrate the new weights when the options ask for it
    and attach the pass to the result's report.

    ``teacher`` is the model the calibration targets come from (default:
    ``model`` itself, copied first when ``inplace``). ``rebuilt_from``: the
    options a checkpoint was made with, when ``rewrite`` runs with their
    :meth:`~RewriteOptions.for_rebuild` to rebuild its modules; the report
    then records those options. ``fit_target``: see ``replace_maxpool``.
    """
    options = rewrite.options
    batches: Sequence[Any] | None = None
    synthetic = isinstance(calibration, str) and options.wants_calibration()
    if synthetic:
        batches = None  # made from the teacher once the rewrite knows the input's shape (below)
    elif calibration is not None and options.wants_calibration():
        batches = calibration_batches(calibration, rewrite.name)
    elif options.needs_calibration():
        field, value = options.calibration_option()
        raise UsageError(f"{rewrite.name}: {field}={value!r} needs calibration=, an iterable of input batches "
                         "(a list of tensors or a DataLoader) to fit the new weights on")
    calibrates = synthetic or batches is not None
    if teacher is SAME:
        teacher, why = (model, "") if not inplace or not calibrates else _copy_for_teacher(model)
    else:
        why = "" if teacher is not None else "no teacher model was given"
    if example_input is None and batches:
        example_input = first_input(batches[0])
    result = rewrite_model(model, rewrite, example_input, only=only, skip=skip, inplace=inplace)
    done = result.done
    if synthetic:
        source = teacher if teacher is not None else model
        batches = synthetic_calibration(source, calibration, done.input_shape, rewrite.name)
    if calibrates:
        done = calibrate_pass(teacher, result.model, done, batches, fit_target=fit_target)
        if why:
            done = dataclasses.replace(done, notes=done.notes + (f"calibration without the original model: {why}",))
    if rebuilt_from is not None:
        done = dataclasses.replace(done, options=rebuilt_from.to_dict(),
                                   notes=done.notes + ("weights come from the checkpoint",))
    attach(result.model, report(model).with_pass(done))
    return result.model


def _copy_for_teacher(model: nn.Module) -> tuple[nn.Module | None, str]:
    """The unmodified original, copied before an in-place rewrite changes it."""
    try:
        return copying.copy_module(model), ""
    except Exception as e:  # noqa: BLE001  (any copy failure means: no teacher, say why)
        return None, f"inplace=True and the model could not be copied to keep its activations ({one_line(e)})"


@dataclass(frozen=True)
class Step:
    """One pass to apply: the rewrite (with its options), the example input
    to trace at, the site filters, and for a rebuild the options it stands for."""

    rewrite: Rewrite
    example: Any
    only: str | Sequence[str] | None = None
    skip: str | Sequence[str] | None = None
    rebuilt_from: RewriteOptions | None = None


def apply_steps(model: nn.Module, steps: Sequence[Step], calibration: Iterable[Any] | None = None) -> nn.Module:
    """Apply ``steps`` in order to a copy of ``model``; calibration targets
    come from ``model`` itself. Shared by :func:`convify` and checkpoint rebuilds."""
    result = model
    for step in steps:
        result = run_pass(result, step.rewrite, step.example, only=step.only, skip=step.skip,
                          inplace=result is not model, calibration=calibration, teacher=model,
                          rebuilt_from=step.rebuilt_from)
    return copy_model(model) if result is model else result
