"""The rewrite entry points behind ``convify.replace_maxpool`` and friends."""
from __future__ import annotations

import copy
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn

from .engine import as_args, rewrite_model
from .rewrites import get

Patterns = "str | Sequence[str] | None"


def replace_maxpool(model: nn.Module, example_input: Any = None, *, mode: str = "conv", init: str = "avg",
                    only: str | Sequence[str] | None = None, skip: str | Sequence[str] | None = None,
                    inplace: bool = False, calibration: Iterable[torch.Tensor] | None = None) -> nn.Module:
    """Replace every max pooling in ``model``'s forward by a strided convolution.

    Args:
        model: any ``nn.Module``; it is not modified unless ``inplace=True``.
        example_input: a tensor (or tuple of tensors) the model accepts; worked
            out from the model when omitted.
        mode: ``"conv"`` (dense ``ConvNd(C, C, k, stride)``, the paper's
            learnable pooling), ``"depthwise"`` (``groups=C``) or ``"fold"``
            (drop the pool, move its stride onto the producing convolution).
        init: ``"avg"`` (the new convolution computes average pooling over the
            same window), ``"kaiming"`` (fresh), or ``"fit"`` (least squares
            against the pooling on ``calibration`` batches).
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
    if init == "fit":
        from .fit import fit_maxpool  # noqa: PLC0415  (needs calibration data; optional path)
        return fit_maxpool(model, example_input, mode=mode, only=only, skip=skip, inplace=inplace,
                           calibration=calibration)
    rewrite = get("maxpool")(mode=mode, init=init)
    return rewrite_model(model, rewrite, example_input, only=only, skip=skip, inplace=inplace)


def replace_linear_head(model: nn.Module, example_input: Any = None, *, mode: str = "conv", dense: bool = False,
                        only: str | Sequence[str] | None = None, skip: str | Sequence[str] | None = None,
                        inplace: bool = False) -> nn.Module:
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
            unflattened map, the others 1x1 convolutions; exact. ``"gap"``: a
            1x1 convolution and global average pooling (Network in Network);
            exact for GAP -> Linear heads, an initialization for MLP heads.
        dense: also drop what pins the input size (the final flatten, global
            average pooling, adaptive pooling that is an identity at the
            example size), so a larger input gives an ``(N, K, H', W')`` map.
        only, skip: glob patterns over head names (the first Linear's module
            path: ``"fc"``, ``"classifier.*"``).
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
    rewrite = get("head")(mode=mode, dense=dense)
    result = rewrite_model(model, rewrite, example_input, only=only, skip=skip, inplace=inplace)
    return result


def convify(model: nn.Module, example_input: Any = None, *, pool: str | None = "conv", head: str | None = "conv",
            init: str = "avg", dense: bool = False, only: str | Sequence[str] | None = None,
            skip: str | Sequence[str] | None = None,
            calibration: Iterable[torch.Tensor] | None = None) -> nn.Module:
    """Both rewrites: max pooling to strided convolutions, then Linear heads to convolutions.

    Args:
        pool: ``mode`` of :func:`replace_maxpool` (``"conv"``, ``"depthwise"``,
            ``"fold"``), or None to keep the poolings.
        head: ``mode`` of :func:`replace_linear_head` (``"conv"``, ``"gap"``), or
            None to keep the head.
        init: how the pooling convolutions start (see :func:`replace_maxpool`).
        calibration: input batches for ``init="fit"`` (see :func:`replace_maxpool`); with
            ``head="gap"`` they also fit the heads that ``gap`` cannot make exact.
        dense, only, skip: as in :func:`replace_linear_head`; ``only``/``skip``
            patterns apply to both passes.

    The returned model's ``convify.report`` has one pass per rewrite applied.

    >>> allconv = convify.convify(torchvision.models.vgg11().eval(), torch.randn(1, 3, 224, 224))
    >>> print(convify.report(allconv))
    """
    if calibration is not None and iter(calibration) is calibration:
        calibration = list(calibration)  # a one-shot iterator: both passes read it
    if example_input is None and init == "fit" and calibration is not None:
        example_input = _first_input(calibration)  # shapes at the size the model will be fitted on
    example = as_args(model, example_input)
    result = model
    if pool is not None:
        result = replace_maxpool(result, example, mode=pool, init=init, only=only, skip=skip,
                                 calibration=calibration)
    if head is not None:
        result = replace_linear_head(result, example, mode=head, dense=dense, only=only, skip=skip,
                                     inplace=pool is not None)
        if head == "gap" and init == "fit" and calibration is not None:
            from .fit import fit_gap_heads  # noqa: PLC0415
            result = fit_gap_heads(model, result, calibration)
    elif result is model:
        result = copy.deepcopy(model)
    return result


def _first_input(calibration: Iterable[Any]) -> torch.Tensor | None:
    """One sample of the first calibration batch (a tensor or an (input, label) pair)."""
    batch = next(iter(calibration), None)
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    return batch[:1] if isinstance(batch, torch.Tensor) else None
