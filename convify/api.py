"""The rewrite entry points behind ``convify.replace_maxpool`` and friends."""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn

from convify import onnx_entry
from convify.core import registry
from convify.core.report import Report
from convify.core.report import report as _torch_report
from convify.core.rewrites.head import HeadOptions
from convify.core.rewrites.maxpool import MaxPoolOptions
from convify.errors import UsageError
from convify.fx.inputs import as_args
from convify.fx.rewrites import implementation
from convify.passes import Step, apply_steps, run_pass
from convify.recovery.calibration import first_input
from convify.recovery.fit import check_fit_target

#: The entry points' defaults are the options' own (declared once, in the core).
_POOL, _HEAD = MaxPoolOptions.defaults(), HeadOptions.defaults()


def replace_maxpool(model: nn.Module, example_input: Any = None, *, mode: str = _POOL["mode"],
                    init: str = _POOL["init"], exact_form: str = _POOL["exact_form"],
                    grouped: bool = _POOL["grouped"], only: str | Sequence[str] | None = None,
                    skip: str | Sequence[str] | None = None, inplace: bool = False,
                    calibration: Iterable[torch.Tensor] | str | None = None,
                    fit_target: str = "original") -> nn.Module:
    """Replace every max pooling in ``model``'s forward by a strided convolution.

    Args:
        model: any ``nn.Module``; it is not modified unless ``inplace=True``.
        example_input: a tensor (or tuple of tensors) the model accepts; worked
            out from the model when omitted.
        mode: ``"conv"`` (dense ``ConvNd(C, C, k, stride)``, the paper's
            learnable pooling), ``"depthwise"`` (``groups=C``), ``"fold"``
            (drop the pool, move its stride onto the producing convolution)
            or ``"exact"`` (convolutions and ReLUs that compute the max
            pooling exactly: a trained model keeps its function).
        init: ``"avg"`` (the new convolution computes average pooling over the
            same window), ``"kaiming"`` (fresh), or ``"fit"`` (least squares
            against the pooling on ``calibration`` batches).
        exact_form: with ``mode="exact"``, the shape of each site's layers:
            ``"chain"`` (depthwise convolutions, ReLUs and additions, the
            fastest), ``"separable"`` or ``"direct"`` (convolutions and ReLUs
            only, for neural-network verifiers).
        grouped: with ``mode="exact"``, False writes ordinary convolutions
            (block-diagonal weights) instead of grouped ones, for tools that
            refuse ``groups > 1``.
        calibration: input batches for ``init="fit"`` (tensors or ``(input,
            label)`` pairs; the labels are not used), or ``"synthetic"``:
            images synthesized from the model's BatchNorm statistics, for a
            user without data (see ``convify.recovery.synthetic``).
        fit_target: with ``init="fit"``: ``"original"`` fits each site toward
            the original model's pooling output there, ``"pool"`` toward max
            pooling of the rewritten model's own activations.
        only, skip: glob patterns over site names (``"maxpool"``, ``"features.*"``).
        inplace: skip the deep copy: the result reuses ``model``'s modules and
            parameters (an untraceable model is rewritten in place); use the
            returned model, not ``model``, afterwards.

    Returns:
        A ``torch.fx.GraphModule`` when the model traces as a whole, else the
        model copy with its traceable submodules rewritten. ``convify.report``
        tells what was replaced and skipped.

    >>> m = torchvision.models.resnet18().eval()
    >>> allconv = convify.replace_maxpool(m)
    >>> print(convify.report(allconv))
    """
    check_fit_target(fit_target)
    options = MaxPoolOptions(mode=mode, init=init, exact_form=exact_form, grouped=grouped)
    if onnx_entry.is_onnx(model):
        onnx_entry.refuse_torch_only("replace_maxpool", {"example_input": example_input, "calibration": calibration,
                                                         "inplace": inplace})
        return onnx_entry.rewrite(model, options, only, skip)
    rewrite = implementation(MaxPoolOptions.rewrite)(options)
    return run_pass(model, rewrite, example_input, only=only, skip=skip, inplace=inplace, calibration=calibration,
                    fit_target=fit_target)


def replace_linear_head(model: nn.Module, example_input: Any = None, *, mode: str = _HEAD["mode"],
                        dense: bool = _HEAD["dense"],
                        only: str | Sequence[str] | None = None, skip: str | Sequence[str] | None = None,
                        inplace: bool = False, calibration: Iterable[torch.Tensor] | None = None) -> nn.Module:
    """Turn every Linear classifier head of ``model`` into convolutions.

    A head is a Linear fed by a flattened spatial map (``torch.flatten``,
    ``nn.Flatten``, ``view``/``reshape``, optionally behind global or adaptive
    average pooling or ``x.mean([2, 3])``), with further Linears and
    elementwise ops up to a model output. Linears that feed back into a
    feature map (squeeze-excitation, attention, MLP blocks) are left alone.

    Args:
        model: any ``nn.Module``; it is not modified unless ``inplace=True``.
        example_input: a tensor (or tuple of tensors) at the size the head was
            built for; worked out from the model when omitted.
        mode: ``"conv"``: the first Linear becomes an ``HxW`` convolution on the
            unflattened map, the others 1x1 convolutions; exact. ``"gap"``: the
            paper's head (Network in Network): one 1x1 convolution to the
            classes and global average pooling; on a flattened map (VGG) the
            hidden layers are dropped and it is not exact; behind a global
            average (ResNet) the MLP stays as 1x1 convolutions, exact.
            ``"gap_mlp"``: a 1x1 convolution, global average pooling and the
            MLP as 1x1 convolutions.
        dense: also drop what pins the input size (the final flatten, global
            average pooling, adaptive pooling that is an identity at the
            example size), so a larger input gives an ``(N, K, H', W')`` map.
        only, skip: glob patterns over head names (the first Linear's module
            path: ``"fc"``, ``"classifier.*"``).
        calibration: input batches; with ``mode="gap"`` the heads that cannot
            be exact get their 1x1 convolution fitted toward the original
            logits by least squares (``"gap_mlp"``: toward the first Linear's
            output).
        inplace: skip the deep copy: the result reuses ``model``'s modules and
            parameters (an untraceable model is rewritten in place); use the
            returned model, not ``model``, afterwards.

    Returns:
        A ``torch.fx.GraphModule`` when the model traces as a whole, else the
        model copy with its traceable submodules rewritten; see ``convify.report``.

    >>> fcn = convify.replace_linear_head(torchvision.models.alexnet().eval(), torch.randn(1, 3, 224, 224),
    ...                                   dense=True)
    >>> fcn(torch.randn(1, 3, 451, 451)).shape
    torch.Size([1, 1000, 8, 8])
    """
    options = HeadOptions(mode=mode, dense=dense)
    if onnx_entry.is_onnx(model):
        onnx_entry.refuse_torch_only("replace_linear_head", {"example_input": example_input,
                                                             "calibration": calibration, "inplace": inplace})
        return onnx_entry.rewrite(model, options, only, skip)
    rewrite = implementation(HeadOptions.rewrite)(options)
    return run_pass(model, rewrite, example_input, only=only, skip=skip, inplace=inplace, calibration=calibration)


def convify(model: nn.Module, example_input: Any = None, *, only: str | Sequence[str] | None = None,
            skip: str | Sequence[str] | None = None, calibration: Iterable[torch.Tensor] | None = None,
            **options: Any) -> nn.Module:
    """Every registered rewrite, in order: max pooling to strided
    convolutions, then Linear heads to convolutions.

    Keyword options (each rewrite declares its own; see ``convify.core.rewrites``):

    * ``pool``: ``mode`` of :func:`replace_maxpool` (``"conv"``, ``"depthwise"``,
      ``"fold"``), or None to keep the poolings; ``init``: as there;
    * ``head``: ``mode`` of :func:`replace_linear_head` (``"conv"``, ``"gap"``, ``"gap_mlp"``),
      or None to keep the head; ``dense``: as there.

    Args:
        calibration: input batches for ``init="fit"``; with ``head="gap"``
            they also fit the heads that ``gap`` cannot make exact. The
            targets always come from ``model``, the original.
        only, skip: glob patterns over site names, applied to every pass.

    The returned model's ``convify.report`` has one pass per rewrite applied;
    the input model is never modified.

    >>> allconv = convify.convify(torchvision.models.vgg11().eval(), torch.randn(1, 3, 224, 224))
    >>> print(convify.report(allconv))
    """
    unknown = registry.unknown_keywords(options)
    if unknown:
        raise UsageError(f"convify() got unknown options {unknown}; the rewrites take {registry.all_keywords()}")
    chosen = [opts for spec in registry.in_order() if (opts := spec.options_from_keywords(options)) is not None]
    if onnx_entry.is_onnx(model):
        onnx_entry.refuse_torch_only("convify", {"example_input": example_input, "calibration": calibration})
        if not chosen:
            raise UsageError("convify(): every rewrite is left out (pool=None, head=None): nothing to do")
        return onnx_entry.rewrite(model, chosen, only, skip)
    planned = [(implementation(o.rewrite), o) for o in chosen]
    batches_given = calibration is not None and not isinstance(calibration, str)  # not the word "synthetic"
    if batches_given and iter(calibration) is calibration:
        calibration = list(calibration)  # a one-shot iterator: every pass reads it
    if example_input is None and batches_given and any(o.wants_calibration() for _, o in planned):
        example_input = first_input(next(iter(calibration), None))  # shapes at the size it is fitted on
    example = as_args(model, example_input)
    return apply_steps(model, [Step(cls(opts), example, only, skip) for cls, opts in planned], calibration)


def report(model: Any) -> Report:
    """The report of every convify rewrite applied to ``model`` (empty if
    none): a PyTorch model carries it as an attribute, an ONNX model (a
    proto, an ``onnx_ir.Model`` or a ``.onnx`` path) in its ``metadata_props``.

    >>> rewritten = convify.replace_maxpool(torchvision.models.resnet18())
    >>> print(convify.report(rewritten))
    """
    return onnx_entry.report(model) if onnx_entry.is_onnx(model) else _torch_report(model)
