"""The rewrite entry points behind ``convify.replace_maxpool`` and friends."""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn

from .engine import rewrite_model
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
        inplace: rewrite ``model`` itself instead of a deep copy.

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
