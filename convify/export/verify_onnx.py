"""``convify.verify`` where an ONNX model stands on either side.

Both models run in onnxruntime on the same inputs: an ONNX side as it is (a
file, an ``onnx.ModelProto`` or an ``onnx_ir.Model``), a PyTorch side exported
first (its export fidelity, onnxruntime against PyTorch, is then measured as
:func:`convify.export.verify.verify` measures it). The equivalence is judged
by the rewritten model's report (an ONNX file carries it in its
``metadata_props``); the census counts the op types of both graphs.

Inputs: ``inputs=`` (a tensor or array, a tuple of them for several graph
inputs, or a list of such batches), else seeded random ones at the shapes
the original declares, 8 samples (one batch of 8 where the batch dimension
is symbolic, else batches of the declared size). A
symbolic dimension other than the batch has no size to draw at: give
``inputs=`` (the error says so).

>>> v = convify.verify("resnet18.onnx", "resnet18_exact.onnx")
>>> print(v)
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from convify.core.report import Report
from convify.core.report import report as torch_report
from convify.errors import ConvifyError, VerificationError, one_line
from convify.export.census import census_checks, op_census
from convify.export.comparison import Fidelity, Tolerance, measure_equivalence, measure_fidelity
from convify.export.onnx import export
from convify.export.sessions import execution_provider, open_session
from convify.export.verification import (DEFAULT_BATCH, INPUT_SEED, Verification, eager_outputs, joined_outputs,
                                         session_outputs, tolerance_for, total_shapes)
from convify.onnx.detect import is_onnx

_NUMPY = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
          "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(uint8)": np.uint8}


def verify_onnx(original: Any, rewritten: Any, *, provider: str = "cpu", inputs: Any = None,
                atol: float | None = None, rtol: float | None = None, min_agreement: float | None = None,
                exporter: str = "dynamo", opset: int | None = None) -> Verification:
    """:func:`convify.verify` with an ONNX model (file, proto or ``onnx_ir.Model``) on either side or both."""
    import onnxruntime as ort  # noqa: PLC0415

    ep = execution_provider(provider)
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="convify-verify-") as tmp:
        sides = {}
        for which, model in (("original", original), ("rewritten", rewritten)):
            sides[which] = _Side(which, model, Path(tmp), ep)
        reference = sides["original"] if sides["original"].session else sides["rewritten"]
        batches = _batches(reference.session, inputs)
        for side in sides.values():
            side.export_torch(batches[0], exporter, opset, ep)
        outputs = {w: joined_outputs([s.run(b) for b in batches], w) for w, s in sides.items()}
        fidelity = _fidelity(sides, batches, outputs, tolerance_for(batches[0], atol, rtol), notes)
        rep = sides["rewritten"].report()
        tol = tolerance_for(batches[0], atol, rtol)
        equivalence = measure_equivalence(outputs["rewritten"], outputs["original"], rep, tol, min_agreement, notes)
        census_before, census_after = sides["original"].census(), sides["rewritten"].census()
        session_providers = tuple(sides["rewritten"].session.get_providers())
    checks = census_checks(rep, census_before, census_after)
    if equivalence.passed is None:
        notes.append("equivalence not judged: the rewrite is not exact (see the report) and no min_agreement "
                     "was given; it passed on the census alone")
    passed = (fidelity is None or fidelity.passed) and equivalence.passed is not False and \
        all(c.passed for c in checks)
    exported = [s.exporter for s in sides.values() if s.exporter]
    return Verification(
        passed=passed, provider=ep, session_providers=session_providers,
        exporter=exported[0] if exported else "none", exporter_fallback=None,
        input_shapes=total_shapes(batches), fidelity=fidelity, equivalence=equivalence,
        census_original=census_before, census_rewritten=census_after, checks=tuple(checks),
        notes=tuple(dict.fromkeys(notes)), onnxruntime_version=ort.__version__,
        inputs_source="seeded random" if inputs is None else "given")


class _Side:
    """One side of the comparison: an ONNX model opened as it is, or a PyTorch model to export."""

    def __init__(self, which: str, model: Any, tmp: Path, ep: str) -> None:
        self.which, self.model, self.tmp, self.exporter = which, model, tmp, None
        self.path: Path | None = None
        self.session = None
        if isinstance(model, nn.Module):
            return
        if not is_onnx(model):
            raise VerificationError(f"{which} must be a torch.nn.Module or an ONNX model (a .onnx file, an "
                                    f"onnx.ModelProto or an onnx_ir.Model), not {type(model).__name__}")
        self.path = self._onnx_file(model)
        self.session = open_session(self.path, ep)

    def _onnx_file(self, model: Any) -> Path:
        if isinstance(model, (str, os.PathLike)):
            from convify.onnx import read_model  # noqa: PLC0415  (checks the file: one clear line if it is bad)

            read_model(model)
            return Path(model)
        from convify.onnx import read_model, write_model  # noqa: PLC0415

        path = self.tmp / f"{self.which}.onnx"
        write_model(read_model(model), path)
        return path

    def export_torch(self, batch: tuple[torch.Tensor, ...], exporter: str, opset: int | None, ep: str) -> None:
        """Export a PyTorch side at the first batch's shapes and open it."""
        if self.session is not None:
            return
        try:
            result = export(self.model, self.tmp / f"{self.which}.onnx", tuple(t[:1] for t in batch),
                            dynamic_batch=True, opset=opset, exporter=exporter)
        except ConvifyError as e:
            raise VerificationError(f"could not export the {self.which} model: {e}") from e
        self.path, self.exporter = result.path, result.exporter
        self.session = open_session(self.path, ep)

    def run(self, batch: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        return session_outputs(self.session, batch, self.which)

    def report(self) -> Report:
        if isinstance(self.model, nn.Module):
            return torch_report(self.model)
        from convify.onnx import report_of  # noqa: PLC0415

        return report_of(self.path)

    def census(self) -> dict[str, int]:
        return op_census(self.path)


def _fidelity(sides: dict[str, _Side], batches: list[tuple[torch.Tensor, ...]], outputs: dict[str, list],
              tol: Tolerance, notes: list[str]) -> Fidelity | None:
    """onnxruntime against PyTorch for the side that was exported (the rewritten one first); None when
    both sides are ONNX: nothing was exported."""
    for which in ("rewritten", "original"):
        side = sides[which]
        if side.exporter:
            eager = joined_outputs([eager_outputs(side.model, b, which) for b in batches], which)
            return measure_fidelity(outputs[which], eager, tol, notes)
    notes.append("export fidelity not applicable: both models are ONNX, nothing was exported")
    return None


def _batches(session: Any, inputs: Any) -> list[tuple[torch.Tensor, ...]]:
    if inputs is None:
        return _random_batches(session)
    if isinstance(inputs, (torch.Tensor, np.ndarray, tuple)):
        return [_as_batch(inputs)]
    batches = [_as_batch(b) for b in inputs]
    if not batches:
        raise VerificationError("inputs holds no batch: give at least one, or leave inputs out for random ones")
    return batches


def _as_batch(batch: Any) -> tuple[torch.Tensor, ...]:
    items = batch if isinstance(batch, tuple) else (batch,)
    try:
        return tuple(torch.as_tensor(np.asarray(t) if not isinstance(t, torch.Tensor) else t) for t in items)
    except (TypeError, ValueError, RuntimeError) as e:
        raise VerificationError(f"each batch of inputs must be a tensor or array, or a tuple of them: "
                                f"{one_line(e)}") from e


def _random_batches(session: Any) -> list[tuple[torch.Tensor, ...]]:
    """Seeded random inputs at the declared shapes: one batch of 8 where the batch dimension is
    symbolic, else as many batches of the declared size as make 8 samples (a graph fixed at batch 1
    still gets its top-1 agreement measured over 8 samples)."""
    rng = np.random.default_rng(INPUT_SEED)
    declared = [i for i in session.get_inputs()]
    fixed = [i.shape[0] for i in declared if i.shape and isinstance(i.shape[0], int) and i.shape[0] > 0]
    per_batch = fixed[0] if fixed else DEFAULT_BATCH
    return [tuple(_random_input(i, per_batch, rng) for i in declared)
            for _ in range(max(1, -(-DEFAULT_BATCH // per_batch)))]


def _random_input(i: Any, batch: int, rng: np.random.Generator) -> torch.Tensor:
    shape = []
    for axis, dim in enumerate(i.shape):
        if axis == 0:
            shape.append(dim if isinstance(dim, int) and dim > 0 else batch)
        elif isinstance(dim, int) and dim > 0:
            shape.append(dim)
        else:
            raise VerificationError(f"input {i.name!r} has no size along axis {axis} ({dim!r}): give inputs= "
                                    "(the command line's --inputs) at the size to compare at")
    dtype = _NUMPY.get(i.type)
    if dtype is None or not np.issubdtype(dtype, np.floating):
        raise VerificationError(f"input {i.name!r} is {i.type}: random inputs are drawn for float inputs only; "
                                "give inputs=")
    return torch.from_numpy(rng.standard_normal(shape).astype(dtype))
