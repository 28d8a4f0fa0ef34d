"""Check a rewrite where it will run: exported to ONNX, in onnxruntime.

``verify(original, rewritten)`` answers three questions and prints them as one table:

* **export fidelity**: does onnxruntime compute what PyTorch computes for ``rewritten``?
* **equivalence**: does ``rewritten`` compute what ``original`` computes? Exact rewrites
  (``convify.report(rewritten).exact``) must agree within tolerance; for the others
  (max pooling to convolution) it reports top-1 agreement, cosine similarity and the
  largest deviation, and judges them only against ``min_agreement``;
* **census**: the ONNX op types before and after: no ``MaxPool`` left after
  ``replace_maxpool``, no ``Gemm``/``MatMul`` left from a converted head.

>>> v = convify.verify(model, convify.replace_maxpool(model), torch.randn(1, 3, 224, 224))
>>> v.passed
True
>>> print(v)
"""
from __future__ import annotations

import os
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from convify.core.report import report
from convify.errors import ConvifyError, ExportError, VerificationError
from convify.export.census import census_checks, op_census
from convify.export.comparison import measure_equivalence, measure_fidelity
from convify.export.onnx import ExportResult, export
from convify.export.sessions import execution_provider, open_session
from convify.export.verification import (DEFAULT_BATCH, INPUT_SEED, Verification, eager_outputs, joined_outputs,
                                         session_outputs, tolerance_for, total_shapes)
from convify.fx.inputs import as_args
from convify.onnx.detect import is_onnx

# --------------------------------------------------------------------------- verify


def verify(original: nn.Module, rewritten: nn.Module, example_input: Any = None, *, provider: str = "cpu",
           inputs: Any = None, atol: float | None = None, rtol: float | None = None,
           min_agreement: float | None = None, exporter: str = "dynamo", onnx_path: str | os.PathLike | None = None,
           opset: int | None = None) -> Verification:
    """Export ``rewritten`` to ONNX, run it in onnxruntime, and check it against
    PyTorch and against ``original``.

    Args:
        original, rewritten: the model before and after convify (either may be a GraphModule), or
            ONNX models (``.onnx`` paths, ``onnx.ModelProto`` or ``onnx_ir.Model``) on either side or
            both: both then run in onnxruntime (:mod:`convify.export.verify_onnx`), at the shapes the
            ONNX original declares unless ``inputs`` are given.
        example_input: a tensor or tuple of tensors for the export; worked out from
            ``original`` when omitted (or taken from ``inputs``).
        provider: ``"cpu"`` (CPUExecutionProvider) or ``"cuda"`` (CUDAExecutionProvider,
            which needs the ``onnxruntime-gpu`` package in place of ``onnxruntime``).
            A provider that cannot run is a ``VerificationError``, never a quiet CPU run.
        inputs: what to compare on: one batch (a tensor, or a tuple of tensors for a
            model of several inputs), or a list (any iterable) of such batches, run
            one at a time and measured together (top-1 agreement over all their
            samples); by default one batch of 8 seeded random inputs of
            ``example_input``'s shape. ``example_input`` (else the first batch) is
            still what the models are exported with.
        atol, rtol: pass when ``max|a - b| <= atol + rtol * max|b|``; defaults
            ``atol=0``, ``rtol=1e-4`` (1e-2 for half-precision outputs). Used for export
            fidelity and for the equivalence of exact rewrites.
        min_agreement: for rewrites that are not exact, the top-1 agreement with
            ``original`` required to pass; without it their equivalence is measured
            but not judged.
        exporter: ``"dynamo"`` (default; falls back to legacy with a warning) or ``"legacy"``.
        onnx_path: keep the exported ``rewritten`` here (a temporary file otherwise).
        opset: ONNX opset for both exports.

    Returns:
        A :class:`Verification`; ``.passed`` and ``print(v)`` for the table.

    Raises:
        VerificationError: the provider is not available or fell back to the CPU,
            or a model could not be exported or run.

    >>> allconv = convify.replace_maxpool(model)
    >>> v = convify.verify(model, allconv, torch.randn(1, 3, 224, 224), min_agreement=0.5)
    >>> print(v)
    """
    import onnxruntime as ort  # noqa: PLC0415  (heavy; loaded on first use)

    if is_onnx(original) or is_onnx(rewritten):
        from convify.export.verify_onnx import verify_onnx  # noqa: PLC0415

        if example_input is not None or onnx_path is not None:
            raise VerificationError("verify with an ONNX model: example_input and onnx_path apply to PyTorch models "
                                    "only; give inputs= to choose what to compare on")
        return verify_onnx(original, rewritten, provider=provider, inputs=inputs, atol=atol, rtol=rtol,
                           min_agreement=min_agreement, exporter=exporter, opset=opset)
    ep = execution_provider(provider)
    for name, m in (("original", original), ("rewritten", rewritten)):
        if not isinstance(m, nn.Module):
            raise VerificationError(f"{name} must be a torch.nn.Module, got {type(m).__name__}")
    batches = _batches(original, example_input, inputs)
    example = as_args(original, example_input) if example_input is not None else batches[0]
    tol = tolerance_for(batches[0], atol, rtol)
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="convify-verify-") as tmp:
        target = Path(onnx_path) if onnx_path is not None else Path(tmp) / "rewritten.onnx"
        exported = _export(rewritten, "rewritten", target, example, exporter, opset)
        census_after = op_census(exported.path)
        census_before = _original_census(original, example, exporter, opset, Path(tmp), notes)
        session = open_session(exported.path, ep)
        ran = joined_outputs([session_outputs(session, b, "exported") for b in batches], "onnxruntime")
    eager_new = joined_outputs([eager_outputs(rewritten, b, "rewritten") for b in batches], "rewritten")
    eager_old = joined_outputs([eager_outputs(original, b, "original") for b in batches], "original")
    fidelity = measure_fidelity(ran, eager_new, tol, notes)
    rep = report(rewritten)
    equivalence = measure_equivalence(eager_new, eager_old, rep, tol, min_agreement, notes)
    checks = census_checks(rep, census_before, census_after)
    if exported.fallback_reason:
        notes.insert(0, f"dynamo exporter failed ({exported.fallback_reason}); the legacy exporter was used")
    if equivalence.passed is None:
        notes.append("equivalence not judged: the rewrite is not exact (see the report) and no min_agreement "
                     "was given; it passed on export fidelity and the census alone")
    passed = fidelity.passed and equivalence.passed is not False and all(c.passed for c in checks)
    return Verification(
        passed=passed, provider=ep, session_providers=tuple(session.get_providers()),
        exporter=exported.exporter, exporter_fallback=exported.fallback_reason,
        input_shapes=total_shapes(batches), fidelity=fidelity, equivalence=equivalence,
        census_original=census_before, census_rewritten=census_after, checks=tuple(checks),
        notes=tuple(dict.fromkeys(notes)), onnx_path=exported.path if onnx_path is not None else None,
        onnxruntime_version=ort.__version__, inputs_source="seeded random" if inputs is None else "given",
    )



# --------------------------------------------------------------------------- inputs and runs


def _batches(original: nn.Module, example_input: Any, inputs: Any) -> list[tuple[torch.Tensor, ...]]:
    """The batches to compare on: ``inputs`` as one batch or several, else one random batch."""
    if inputs is None:
        return [_random_batch(original, example_input)]
    if isinstance(inputs, (torch.Tensor, tuple)):
        return [_batch(original, inputs)]
    try:
        batches = [_batch(original, b) for b in inputs]
    except TypeError as e:
        raise VerificationError(f"inputs must be a tensor, a tuple of tensors or a list of such batches, not "
                                f"{type(inputs).__name__}") from e
    if not batches:
        raise VerificationError("inputs holds no batch: give at least one, or leave inputs out for random ones")
    return batches


def _batch(original: nn.Module, batch: Any) -> tuple[torch.Tensor, ...]:
    try:
        return as_args(original, batch)
    except ConvifyError as e:
        raise VerificationError(f"each batch of inputs must be a tensor or a tuple of tensors: {e}") from e


def _random_batch(original: nn.Module, example_input: Any) -> tuple[torch.Tensor, ...]:
    example = as_args(original, example_input)
    gen = torch.Generator().manual_seed(INPUT_SEED)
    batch = []
    for t in example:
        shape = (DEFAULT_BATCH, *t.shape[1:]) if t.dim() else t.shape
        if t.dtype.is_floating_point:
            batch.append(torch.randn(shape, generator=gen, dtype=torch.float32).to(t.dtype).to(t.device))
        else:  # token ids and masks: repeat the example rather than invent values
            batch.append(t[:1].expand(shape).clone() if t.dim() else t.clone())
    return tuple(batch)


def _export(model: nn.Module, which: str, path: Path, example: tuple, exporter: str,
            opset: int | None) -> ExportResult:
    try:
        return export(model, path, example, dynamic_batch=True, opset=opset, exporter=exporter)
    except ExportError as e:
        raise VerificationError(f"could not export the {which} model: {e}") from e


# Census of each original, keyed by the module and a fingerprint of its weights
# and the export settings, so that verifying several rewrites of one model
# exports the original once.
_CENSUS_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple[Any, dict[str, int]]]" = weakref.WeakKeyDictionary()


def _fingerprint(model: nn.Module, example: tuple, exporter: str, opset: int | None) -> Any:
    state = tuple((k, v.data_ptr(), v._version, tuple(v.shape), v.dtype)
                  for k, v in model.state_dict(keep_vars=True).items())
    shapes = tuple((tuple(t.shape), t.dtype) for t in example)
    return exporter, opset, shapes, state, tuple(m.training for m in model.modules())


def _original_census(original: nn.Module, example: tuple, exporter: str, opset: int | None, tmp: Path,
                     notes: list[str]) -> dict[str, int] | None:
    key = _fingerprint(original, example, exporter, opset)
    cached = _CENSUS_CACHE.get(original)
    if cached is not None and cached[0] == key:
        return cached[1]
    try:
        result = export(original, tmp / "original.onnx", example, dynamic_batch=True, opset=opset, exporter=exporter)
    except ExportError as e:
        notes.append(f"the original model could not be exported, so its census is missing: {e}")
        return None
    census = op_census(result.path)
    _CENSUS_CACHE[original] = (key, census)
    return census


