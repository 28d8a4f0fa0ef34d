"""Comparing outputs for ``verify``: export fidelity (onnxruntime against PyTorch) and
equivalence (the rewritten model against the original), and the records they are reported in.

Exact rewrites are judged on ``max|a - b|`` against a :class:`Tolerance`; the
others on top-1 agreement (:func:`convify.core.metrics.top1_agreement`) with
cosine similarity and the largest deviation reported beside it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from convify.core.metrics import top1_agreement
from convify.core.report import Report
from convify.wording import counted, noun


@dataclass(frozen=True)
class Tolerance:
    """Pass when ``max|a - b| <= atol + rtol * max|b|`` (``b`` the reference)."""

    rtol: float
    atol: float = 0.0

    def admits(self, max_abs: float, ref_max: float) -> bool:
        return max_abs <= self.atol + self.rtol * ref_max

    def __str__(self) -> str:
        if self.atol == 0:
            return f"rel <= {self.rtol:.0e}"
        return f"abs <= {self.atol:.0e} + {self.rtol:.0e}*max|ref|"


@dataclass(frozen=True)
class Fidelity:
    """onnxruntime against PyTorch eager, both running ``rewritten``."""

    max_abs: float
    rel: float
    tolerance: Tolerance
    passed: bool


@dataclass(frozen=True)
class Equivalence:
    """``rewritten`` against ``original``, both in PyTorch eager.

    ``passed`` is ``None`` when the rewrite is not exact and no ``min_agreement``
    was given: its equivalence was measured but not judged.
    """

    exact: bool
    max_abs: float | None
    rel: float | None
    top1_agreement: float | None
    cosine: float | None
    min_agreement: float | None
    tolerance: Tolerance
    passed: bool | None

    @property
    def judged(self) -> bool:
        return self.passed is not None


def _max_abs_and_ref(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> tuple[float, float]:
    """Worst ``max|a - b|`` over the outputs, with that output's ``max|b|``."""
    worst, ref, worst_rel = 0.0, 0.0, -1.0
    for x, y in zip(a, b):
        x, y = x.double(), y.double()
        diff = float((x - y).abs().max()) if x.numel() else 0.0
        scale = float(y.abs().max()) if y.numel() else 0.0
        rel = diff / max(scale, 1e-30)
        if rel > worst_rel:
            worst, ref, worst_rel = diff, scale, rel
    return worst, ref


def measure_fidelity(ran: list[torch.Tensor], eager: list[torch.Tensor], tol: Tolerance,
                     notes: list[str]) -> Fidelity:
    """onnxruntime's outputs ``ran`` against PyTorch's ``eager``, both of the rewritten model."""
    if len(ran) != len(eager) or any(a.shape != b.shape for a, b in zip(ran, eager)):
        notes.append(f"onnxruntime returned shapes {[tuple(t.shape) for t in ran]} where PyTorch returns "
                     f"{[tuple(t.shape) for t in eager]}")
        return Fidelity(math.inf, math.inf, tol, False)
    max_abs, ref = _max_abs_and_ref(ran, eager)
    rel = max_abs / max(ref, 1e-30)
    return Fidelity(max_abs, rel, tol, tol.admits(max_abs, ref) and math.isfinite(max_abs))


def _comparable(new: list[torch.Tensor], old: list[torch.Tensor], notes: list[str]) -> list[torch.Tensor] | None:
    """``new`` shaped like ``old``: a dense head's score maps ``(N, K, *S)`` are
    averaged over ``S`` to compare with ``(N, K)``."""
    if len(new) != len(old):
        notes.append(f"rewritten returns {counted(len(new), 'output')}, original {len(old)}: equivalence not "
                     "comparable")
        return None
    out = []
    for a, b in zip(new, old):
        if a.shape == b.shape:
            out.append(a)
        elif a.dim() > b.dim() and a.shape[:b.dim()] == b.shape:
            extra = tuple(range(b.dim(), a.dim()))
            notes.append(f"rewritten output {tuple(a.shape)} averaged over its positions to compare with the "
                         f"original's {tuple(b.shape)}")
            out.append(a.mean(dim=extra))
        else:
            notes.append(f"rewritten output {tuple(a.shape)} vs original {tuple(b.shape)}: not comparable")
            return None
    return out


def _top1_and_cosine(new: list[torch.Tensor], old: list[torch.Tensor]) -> tuple[float | None, float | None]:
    agree, cos = [], []
    for a, b in zip(new, old):
        if a.dim() >= 1 and a.shape[0] > 0:
            cos.append(float(torch.nn.functional.cosine_similarity(
                a.double().flatten(1) if a.dim() > 1 else a.double()[:, None],
                b.double().flatten(1) if b.dim() > 1 else b.double()[:, None], dim=1).mean()))
        if a.dim() >= 2 and a.shape[1] > 1:
            agree.append(top1_agreement(a, b))
    return (min(agree) if agree else None), (min(cos) if cos else None)


def measure_equivalence(new: list[torch.Tensor], old: list[torch.Tensor], rep: Report, tol: Tolerance,
                        min_agreement: float | None, notes: list[str]) -> Equivalence:
    """The rewritten model's outputs ``new`` against the original's ``old``, judged as ``rep`` says:
    within ``tol`` for an exact rewrite, on top-1 agreement (``min_agreement``) for the others."""
    exact = rep.exact
    if not rep.passes:
        notes.append("rewritten has no convify report: compared with the original as an exact copy")
    elif exact:
        pass
    else:
        inexact = sorted({r.rewrite for r in rep.replaced if not r.exact})
        notes.append(f"not exact by construction: {', '.join(inexact)} {noun(len(inexact), 'rewrite')} "
                     "(see convify.report)")
    same = _comparable(new, old, notes)
    if same is None:
        return Equivalence(exact, None, None, None, None, min_agreement, tol,
                           False if exact or min_agreement is not None else None)
    max_abs, ref = _max_abs_and_ref(same, old)
    rel = max_abs / max(ref, 1e-30)
    top1, cosine = _top1_and_cosine(same, old)
    if exact:
        passed: bool | None = tol.admits(max_abs, ref) and math.isfinite(max_abs)
    elif min_agreement is None:
        passed = None
    elif top1 is None:
        notes.append("min_agreement given but the outputs have no class dimension to take a top-1 over")
        passed = False
    else:
        passed = top1 >= min_agreement
    return Equivalence(exact, max_abs, rel, top1, cosine, min_agreement, tol, passed)

