"""The ridge least squares behind ``init="fit"``: normal equations accumulated batch by batch, solved
toward a convolution's current weights, installed in it, and the report row that says how it went."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from convify.core import weights as W
from convify.core.report import Fit, Replaced

#: Ridge strength relative to the mean diagonal of ``X^T X`` (scale-free).
RIDGE = 1e-4


@dataclass
class NormalEquations:
    """The accumulated normal equations of one site: ``X^T X``, ``X^T Y`` and ``sum(Y^2)``."""

    gram: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    target_sq: torch.Tensor | None = None
    samples: int = 0

    def add(self, gram: torch.Tensor, cross: torch.Tensor, sq: torch.Tensor, samples: int) -> None:
        if self.gram is None:
            self.gram, self.cross, self.target_sq = gram, cross, sq
        else:
            self.gram += gram
            self.cross += cross
            self.target_sq += sq
        self.samples += samples


def solve_and_install(conv: nn.modules.conv._ConvNd, normal: NormalEquations, depthwise: bool, *, start: str,
                      toward: str) -> Fit:
    """Ridge solve toward the conv's current weights, install the solution, report both errors."""
    with torch.no_grad():
        prior = weights_as_matrix(conv, depthwise, normal.gram.dtype, normal.gram.device)
        solution = W.ridge_solve(normal.gram, normal.cross, prior, RIDGE)
        before, after = _relative_error(normal, prior), _relative_error(normal, solution)
        _install(conv, solution, depthwise)
    return Fit(before, after, normal.samples, start, toward)


def weights_as_matrix(conv: nn.modules.conv._ConvNd, depthwise: bool, dtype: torch.dtype,
                      device: torch.device) -> torch.Tensor:
    """The conv's weight and bias in the layout of the normal equations:
    dense ``(C*K+1, C)``, depthwise ``(C, K+1, 1)``."""
    w = conv.weight.detach().to(device=device, dtype=dtype)
    b = conv.bias.detach().to(device=device, dtype=dtype)
    out = w.shape[0]
    if depthwise:
        return torch.cat([w.reshape(out, -1), b[:, None]], dim=1).unsqueeze(-1)
    return torch.cat([w.reshape(out, -1).T, b[None, :]], dim=0)


def _install(conv: nn.modules.conv._ConvNd, solution: torch.Tensor, depthwise: bool) -> None:
    out = conv.weight.shape[0]
    if depthwise:
        w, b = solution[:, :-1, 0], solution[:, -1, 0]
    else:
        w, b = solution[:-1].T, solution[-1]
    conv.weight.copy_(w.reshape(conv.weight.shape).to(conv.weight))
    conv.bias.copy_(b.reshape(out).to(conv.bias))


def _relative_error(normal: NormalEquations, w: torch.Tensor) -> float:
    """``||X w - Y|| / ||Y||`` over every calibration output at the site."""
    sse = W.squared_residual(normal.gram, normal.cross, normal.target_sq, w).sum()
    total = normal.target_sq.sum()
    return float(math.sqrt(float(sse) / max(float(total), 1e-300)))


def with_fit(row: Replaced, result: Fit | str) -> Replaced:
    """The row with its fit, or with the note that says why it was not fitted."""
    if isinstance(result, Fit):
        return dataclasses.replace(row, fit=result)
    return dataclasses.replace(row, notes=row.notes + (result,))
