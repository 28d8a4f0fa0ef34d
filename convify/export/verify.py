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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from convify.core.report import format_table, report
from convify.errors import ConvifyError, ExportError, VerificationError, one_line
from convify.export.census import CensusCheck, census_checks, op_census
from convify.export.comparison import Equivalence, Fidelity, Tolerance, measure_equivalence, measure_fidelity
from convify.export.onnx import ExportResult, export
from convify.export.sessions import execution_provider, open_session
from convify.fx import copying
from convify.fx.inputs import as_args
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
    fidelity: Fidelity
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
            "fidelity": {"max_abs": self.fidelity.max_abs, "rel": self.fidelity.rel,
                         "limit": str(self.fidelity.tolerance), "passed": self.fidelity.passed},
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
        title = (f"convify verify: {'PASSED' if self.passed else 'FAILED'}  "
                 f"[onnxruntime {self.onnxruntime_version} on {self.provider}, {exporter} exporter, "
                 f"inputs {shapes}, {self.inputs_source}]")
        rows = [self._fidelity_row(), self._equivalence_row()]
        rows += [self._check_row(c) for c in self.checks]
        parts = [title, format_table(["check", "measured", "limit", "result"], rows)]
        parts.append(self._census_table())
        parts += [f"note: {n}" for n in self.notes]
        return "\n".join(parts)

    def _fidelity_row(self) -> list[str]:
        f = self.fidelity
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


# --------------------------------------------------------------------------- verify


def verify(original: nn.Module, rewritten: nn.Module, example_input: Any = None, *, provider: str = "cpu",
           inputs: Any = None, atol: float | None = None, rtol: float | None = None,
           min_agreement: float | None = None, exporter: str = "dynamo", onnx_path: str | os.PathLike | None = None,
           opset: int | None = None) -> Verification:
    """Export ``rewritten`` to ONNX, run it in onnxruntime, and check it against
    PyTorch and against ``original``.

    Args:
        original, rewritten: the model before and after convify (either may be a GraphModule).
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

    ep = execution_provider(provider)
    for name, m in (("original", original), ("rewritten", rewritten)):
        if not isinstance(m, nn.Module):
            raise VerificationError(f"{name} must be a torch.nn.Module, got {type(m).__name__}")
    batches = _batches(original, example_input, inputs)
    example = as_args(original, example_input) if example_input is not None else batches[0]
    tol = _tolerance(rewritten, batches[0], atol, rtol)
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="convify-verify-") as tmp:
        target = Path(onnx_path) if onnx_path is not None else Path(tmp) / "rewritten.onnx"
        exported = _export(rewritten, "rewritten", target, example, exporter, opset)
        census_after = op_census(exported.path)
        census_before = _original_census(original, example, exporter, opset, Path(tmp), notes)
        session = open_session(exported.path, ep)
        ran = _joined([_run_session(session, b) for b in batches], "onnxruntime")
    eager_new = _joined([_eager(rewritten, b, "rewritten") for b in batches], "rewritten")
    eager_old = _joined([_eager(original, b, "original") for b in batches], "original")
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
        input_shapes=_total_shapes(batches), fidelity=fidelity, equivalence=equivalence,
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


def _total_shapes(batches: list[tuple[torch.Tensor, ...]]) -> tuple[Shape, ...]:
    """The shapes of the batches put end to end (the first batch's where they do not line up)."""
    first = batches[0]
    if any(len(b) != len(first) or any(t.dim() == 0 or t.shape[1:] != f.shape[1:] for t, f in zip(b, first))
           for b in batches):
        return tuple(tuple(t.shape) for t in first)
    return tuple((sum(b[i].shape[0] for b in batches), *t.shape[1:]) for i, t in enumerate(first))


def _joined(outputs: list[list[torch.Tensor]], which: str) -> list[torch.Tensor]:
    """Each output of the batches concatenated along the batch dimension."""
    if len(outputs) == 1:
        return outputs[0]
    try:
        return [torch.cat(parts) for parts in zip(*outputs, strict=True)]
    except (RuntimeError, ValueError) as e:
        raise VerificationError(f"the {which} outputs of the batches of inputs do not line up ({one_line(e)}); "
                                "give batches of one shape") from e


def _tolerance(rewritten: nn.Module, batch: tuple[torch.Tensor, ...], atol: float | None,
               rtol: float | None) -> Tolerance:
    low = any(t.dtype in (torch.float16, torch.bfloat16) for t in batch)
    default = DEFAULT_RTOL_LOW if low else DEFAULT_RTOL
    return Tolerance(rtol=default if rtol is None else float(rtol), atol=0.0 if atol is None else float(atol))


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


def _run_session(session: Any, batch: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(batch):
        raise VerificationError(f"the exported graph takes {counted(len(names), 'input')} ({', '.join(names)}) "
                                f"but got {len(batch)}")
    feed = {n: t.detach().cpu().numpy() for n, t in zip(names, batch)}
    try:
        return [torch.from_numpy(o) for o in session.run(None, feed)]
    except Exception as e:
        raise VerificationError(f"onnxruntime failed to run the exported model on inputs "
                                f"{[tuple(t.shape) for t in batch]}: {one_line(e)}") from e


def _eager(model: nn.Module, batch: tuple[torch.Tensor, ...], which: str) -> list[torch.Tensor]:
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
