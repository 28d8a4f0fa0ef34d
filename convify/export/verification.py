"""What :func:`convify.verify` returns (:class:`Verification`), its defaults, and the
helpers both of its paths share (PyTorch models exported, ONNX models as given:
:mod:`convify.export.verify` and :mod:`convify.export.verify_onnx`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn

from convify.core.report import format_table
from convify.errors import VerificationError, one_line
from convify.export.census import CensusCheck
from convify.export.comparison import Equivalence, Fidelity, Tolerance
from convify.fx import copying
from convify.wording import counted

DEFAULT_BATCH = 8
DEFAULT_RTOL = 1e-4          # float32 and float64
DEFAULT_RTOL_LOW = 1e-2      # float16 / bfloat16
INPUT_SEED = 0

Shape = tuple[int, ...]


# --------------------------------------------------------------------------- result


@dataclass(frozen=True)
class Verification:
    """The outcome of :func:`verify`; ``str()`` is a table, ``to_dict()`` JSON-ready."""

    passed: bool
    provider: str
    session_providers: tuple[str, ...]
    exporter: str
    exporter_fallback: str | None
    input_shapes: tuple[Shape, ...]
    fidelity: Fidelity | None  # None: nothing was exported (ONNX models on both sides)
    equivalence: Equivalence
    census_original: Mapping[str, int] | None
    census_rewritten: Mapping[str, int]
    checks: tuple[CensusCheck, ...] = ()
    notes: tuple[str, ...] = ()
    onnx_path: Path | None = None
    onnxruntime_version: str = ""
    inputs_source: str = "seeded random"   # where the compared inputs came from: "seeded random", "given"

    @property
    def input_count(self) -> int:
        """How many inputs (samples along the batch dimension) were compared."""
        return self.input_shapes[0][0] if self.input_shapes and self.input_shapes[0] else 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed, "provider": self.provider, "session_providers": list(self.session_providers),
            "exporter": self.exporter, "exporter_fallback": self.exporter_fallback,
            "input_shapes": [list(s) for s in self.input_shapes],
            "inputs": {"source": self.inputs_source, "count": self.input_count},
            "fidelity": None if self.fidelity is None else {
                "max_abs": self.fidelity.max_abs, "rel": self.fidelity.rel, "limit": str(self.fidelity.tolerance),
                "passed": self.fidelity.passed},
            "equivalence": {"exact": self.equivalence.exact, "max_abs": self.equivalence.max_abs,
                            "rel": self.equivalence.rel, "top1_agreement": self.equivalence.top1_agreement,
                            "cosine": self.equivalence.cosine, "min_agreement": self.equivalence.min_agreement,
                            "limit": str(self.equivalence.tolerance), "passed": self.equivalence.passed},
            "census": {"original": dict(self.census_original) if self.census_original is not None else None,
                       "rewritten": dict(self.census_rewritten)},
            "checks": [{"ops": list(c.ops), "original": c.original, "rewritten": c.rewritten, "at_most": c.at_most,
                        "why": c.why, "passed": c.passed} for c in self.checks],
            "notes": list(self.notes),
            "onnx_path": str(self.onnx_path) if self.onnx_path else None,
        }

    def __str__(self) -> str:
        shapes = ", ".join("x".join(map(str, s)) for s in self.input_shapes)
        exporter = self.exporter + (" (dynamo failed; fell back)" if self.exporter_fallback else "")
        exporter = "ONNX models as given" if self.fidelity is None else f"{exporter} exporter"
        title = (f"convify verify: {'PASSED' if self.passed else 'FAILED'}  "
                 f"[onnxruntime {self.onnxruntime_version} on {self.provider}, {exporter}, "
                 f"inputs {shapes}, {self.inputs_source}]")
        rows = [self._fidelity_row(), self._equivalence_row()]
        rows += [self._check_row(c) for c in self.checks]
        parts = [title, format_table(["check", "measured", "limit", "result"], rows)]
        parts.append(self._census_table())
        parts += [f"note: {n}" for n in self.notes]
        return "\n".join(parts)

    def _fidelity_row(self) -> list[str]:
        f = self.fidelity
        if f is None:
            return ["export fidelity", "-", "-", "not applicable (ONNX models: nothing exported)"]
        return ["export fidelity (onnxruntime vs torch)", f"max abs {f.max_abs:.2e}, rel {f.rel:.2e}",
                str(f.tolerance), _verdict(f.passed)]

    def _equivalence_row(self) -> list[str]:
        e = self.equivalence
        if e.exact:
            measured = "-" if e.rel is None else f"max abs {e.max_abs:.2e}, rel {e.rel:.2e}"
            return ["equivalence (exact rewrite)", measured, str(e.tolerance), _verdict(e.passed)]
        bits = []
        if e.top1_agreement is not None:
            bits.append(f"top-1 agree {e.top1_agreement:.1%}")
        if e.cosine is not None:
            bits.append(f"cosine {e.cosine:.4f}")
        if e.max_abs is not None:
            bits.append(f"max dev {e.max_abs:.3g}")
        limit = f"top-1 agree >= {e.min_agreement:.1%}" if e.min_agreement is not None else "none given"
        return ["equivalence (approximate rewrite)", ", ".join(bits) or "-", limit,
                _verdict(e.passed) if e.judged else "not judged"]

    @staticmethod
    def _check_row(c: CensusCheck) -> list[str]:
        ops = "+".join(c.ops)
        before = "?" if c.original is None else str(c.original)
        return [f"census: {ops} ({c.why})", f"{before} -> {c.rewritten}", f"<= {c.at_most}", _verdict(c.passed)]

    def _census_table(self) -> str:
        before = self.census_original or {}
        ops = sorted(set(before) | set(self.census_rewritten))
        rows = []
        for op in ops:
            a, b = before.get(op, 0), self.census_rewritten.get(op, 0)
            orig = "?" if self.census_original is None else str(a)
            change = "" if self.census_original is None or a == b else f"{b - a:+d}"
            rows.append([op, orig, str(b), change])
        total_a = "?" if self.census_original is None else str(sum(before.values()))
        rows.append(["(all)", total_a, str(sum(self.census_rewritten.values())), ""])
        return "ONNX op census\n" + format_table(["op type", "original", "rewritten", "change"], rows)


def _verdict(passed: bool | None) -> str:
    return "pass" if passed else "FAIL"


def joined_outputs(outputs: list[list[torch.Tensor]], which: str) -> list[torch.Tensor]:
    """Each output of the batches concatenated along the batch dimension."""
    if len(outputs) == 1:
        return outputs[0]
    try:
        return [torch.cat(parts) for parts in zip(*outputs, strict=True)]
    except (RuntimeError, ValueError) as e:
        raise VerificationError(f"the {which} outputs of the batches of inputs do not line up ({one_line(e)}); "
                                "give batches of one shape") from e


def session_outputs(session: Any, batch: tuple[torch.Tensor, ...], which: str) -> list[torch.Tensor]:
    """The outputs of an onnxruntime ``session`` on ``batch``, as tensors;
    a wrong input count or a failed run is a :class:`VerificationError`
    naming the ``which`` model and the input shapes."""
    inputs = session.get_inputs()
    if len(inputs) != len(batch):
        raise VerificationError(f"the {which} graph takes {counted(len(inputs), 'input')} "
                                f"({', '.join(i.name for i in inputs)}) but got {len(batch)}")
    feed = {i.name: t.detach().cpu().numpy() for i, t in zip(inputs, batch)}
    try:
        return [torch.from_numpy(np.asarray(o)) for o in session.run(None, feed)]
    except Exception as e:
        raise VerificationError(f"onnxruntime failed to run the {which} model on inputs "
                                f"{[tuple(t.shape) for t in batch]}: {one_line(e)}") from e


def tolerance_for(batch: tuple[torch.Tensor, ...], atol: float | None, rtol: float | None) -> Tolerance:
    """The tolerance of a comparison on ``batch``: the defaults for its dtype unless given."""
    low = any(t.dtype in (torch.float16, torch.bfloat16) for t in batch)
    default = DEFAULT_RTOL_LOW if low else DEFAULT_RTOL
    return Tolerance(rtol=default if rtol is None else float(rtol), atol=0.0 if atol is None else float(atol))


def eager_outputs(model: nn.Module, batch: tuple[torch.Tensor, ...], which: str) -> list[torch.Tensor]:
    """``model``'s output tensors on ``batch``, run in eval mode (its mode restored after)."""
    try:
        with torch.no_grad(), copying.eval_mode(model):
            out = model(*batch)
    except Exception as e:
        raise VerificationError(f"the {which} model does not run on the verification inputs "
                                f"{[tuple(t.shape) for t in batch]}: {one_line(e)}") from e
    return [t.detach().cpu() for t in _leaves(out) if isinstance(t, torch.Tensor)]


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _leaves(v)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _leaves(v)]
    return [value]


def total_shapes(batches: list[tuple[torch.Tensor, ...]]) -> tuple[Shape, ...]:
    """The shapes of the batches put end to end (the first batch's where they do not line up)."""
    first = batches[0]
    if any(len(b) != len(first) or any(t.dim() == 0 or t.shape[1:] != f.shape[1:] for t, f in zip(b, first))
           for b in batches):
        return tuple(tuple(t.shape) for t in first)
    return tuple((sum(b[i].shape[0] for b in batches), *t.shape[1:]) for i, t in enumerate(first))
