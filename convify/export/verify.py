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

import math
import os
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from convify.core.report import Report, format_table, report
from convify.errors import ConvifyError, ExportError, VerificationError, one_line
from convify.export.onnx import ExportResult, export, op_census
from convify.fx import copying
from convify.fx.inputs import as_args

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
DEFAULT_BATCH = 8
DEFAULT_RTOL = 1e-4          # float32 and float64
DEFAULT_RTOL_LOW = 1e-2      # float16 / bfloat16
INPUT_SEED = 0

Shape = tuple[int, ...]


# --------------------------------------------------------------------------- result


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


@dataclass(frozen=True)
class CensusCheck:
    """One expectation on the op counts of the exported graphs."""

    ops: tuple[str, ...]
    original: int | None
    rewritten: int
    at_most: int
    why: str

    @property
    def passed(self) -> bool:
        return self.rewritten <= self.at_most


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed, "provider": self.provider, "session_providers": list(self.session_providers),
            "exporter": self.exporter, "exporter_fallback": self.exporter_fallback,
            "input_shapes": [list(s) for s in self.input_shapes],
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
                 f"inputs {shapes}]")
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
        inputs: the batch to compare on (a tensor or tuple of tensors); by default
            8 seeded random inputs of ``example_input``'s shape.
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

    ep = _provider(provider, ort)
    for name, m in (("original", original), ("rewritten", rewritten)):
        if not isinstance(m, nn.Module):
            raise VerificationError(f"{name} must be a torch.nn.Module, got {type(m).__name__}")
    batch = _inputs(original, example_input, inputs)
    example = as_args(original, example_input) if example_input is not None else batch
    tol = _tolerance(rewritten, batch, atol, rtol)
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="convify-verify-") as tmp:
        target = Path(onnx_path) if onnx_path is not None else Path(tmp) / "rewritten.onnx"
        exported = _export(rewritten, "rewritten", target, example, exporter, opset)
        census_after = op_census(exported.path)
        census_before = _original_census(original, example, exporter, opset, Path(tmp), notes)
        session = _session(exported.path, ep, ort)
        ran = _run_session(session, batch)
    eager_new = _eager(rewritten, batch, "rewritten")
    eager_old = _eager(original, batch, "original")
    fidelity = _fidelity(ran, eager_new, tol, notes)
    rep = report(rewritten)
    equivalence = _equivalence(eager_new, eager_old, rep, tol, min_agreement, notes)
    checks = _census_checks(rep, census_before, census_after)
    if exported.fallback_reason:
        notes.insert(0, f"dynamo exporter failed ({exported.fallback_reason}); the legacy exporter was used")
    if equivalence.passed is None:
        notes.append("equivalence not judged: the rewrite is not exact (see the report) and no min_agreement "
                     "was given; it passed on export fidelity and the census alone")
    passed = fidelity.passed and equivalence.passed is not False and all(c.passed for c in checks)
    return Verification(
        passed=passed, provider=ep, session_providers=tuple(session.get_providers()),
        exporter=exported.exporter, exporter_fallback=exported.fallback_reason,
        input_shapes=tuple(tuple(t.shape) for t in batch), fidelity=fidelity, equivalence=equivalence,
        census_original=census_before, census_rewritten=census_after, checks=tuple(checks),
        notes=tuple(dict.fromkeys(notes)), onnx_path=exported.path if onnx_path is not None else None,
        onnxruntime_version=ort.__version__,
    )


def demo_verify(original: nn.Module, rewritten: nn.Module, example_input: Any = None, *,
                path: str | os.PathLike | None = None, provider: str = "cpu", exporter: str = "dynamo",
                min_agreement: float | None = None, echo: Callable[[str], Any] = print) -> Verification:
    """What ``convify demo`` shows: export ``rewritten`` (to ``path`` when given),
    verify it in onnxruntime, and print the verification table.

    >>> demo_verify(model, convify.replace_maxpool(model), torch.randn(1, 3, 224, 224), path="allconv.onnx")
    """
    result = verify(original, rewritten, example_input, provider=provider, exporter=exporter, onnx_path=path,
                    min_agreement=min_agreement)
    if result.onnx_path is not None:
        size = result.onnx_path.stat().st_size / 2**20
        echo(f"exported {result.onnx_path} ({size:.1f} MiB, {result.exporter} exporter, weights embedded)")
    echo(str(result))
    return result


# --------------------------------------------------------------------------- providers


def _provider(provider: str, ort: Any) -> str:
    ep = PROVIDERS.get(provider.lower()) if isinstance(provider, str) else None
    if ep is None:
        raise VerificationError(f"provider must be 'cpu' or 'cuda', not {provider!r}")
    available = ort.get_available_providers()
    if ep not in available:
        raise VerificationError(
            f"provider={provider!r} needs onnxruntime's {ep}, which this onnxruntime {ort.__version__} does not "
            f"have (it has {', '.join(available)}). For CUDA, replace the CPU package with the GPU one "
            "(they cannot be installed together): pip uninstall onnxruntime && pip install onnxruntime-gpu")
    return ep


def _session(path: Path, ep: str, ort: Any) -> Any:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the per-node placement warnings are noise here
    providers = [ep] if ep == "CPUExecutionProvider" else [ep, "CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as e:
        raise VerificationError(f"onnxruntime could not load {path} on {ep}: {one_line(e)}") from e
    got = session.get_providers()
    if not got or got[0] != ep:
        # onnxruntime drops a provider it cannot initialize (no GPU, missing CUDA or
        # cuDNN libraries) and runs on the CPU without an error: refuse that.
        raise VerificationError(
            f"onnxruntime was asked for {ep} but the session runs on {', '.join(got) or 'nothing'}: {ep} is "
            "installed but could not start (no GPU visible, or the CUDA/cuDNN libraries onnxruntime-gpu needs "
            "are missing); fix the CUDA setup or verify with provider='cpu'")
    return session


# --------------------------------------------------------------------------- inputs and runs


def _inputs(original: nn.Module, example_input: Any, inputs: Any) -> tuple[torch.Tensor, ...]:
    if inputs is not None:
        try:
            return as_args(original, inputs)
        except ConvifyError as e:
            raise VerificationError(f"inputs must be a tensor or a tuple of tensors: {e}") from e
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
        raise VerificationError(f"the exported graph takes {len(names)} inputs ({', '.join(names)}) but "
                                f"{len(batch)} were given")
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


# --------------------------------------------------------------------------- comparisons


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


def _fidelity(ran: list[torch.Tensor], eager: list[torch.Tensor], tol: Tolerance, notes: list[str]) -> Fidelity:
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
        notes.append(f"rewritten returns {len(new)} outputs, original {len(old)}: equivalence not comparable")
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
            agree.append(float((a.argmax(1) == b.argmax(1)).double().mean()))
    return (min(agree) if agree else None), (min(cos) if cos else None)


def _equivalence(new: list[torch.Tensor], old: list[torch.Tensor], rep: Report, tol: Tolerance,
                 min_agreement: float | None, notes: list[str]) -> Equivalence:
    exact = rep.exact
    if not rep.passes:
        notes.append("rewritten has no convify report: compared with the original as an exact copy")
    elif exact:
        pass
    else:
        inexact = sorted({r.rewrite for r in rep.replaced if not r.exact})
        notes.append(f"not exact by construction: {', '.join(inexact)} rewrite(s) (see convify.report)")
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


# --------------------------------------------------------------------------- census checks


def _census_checks(rep: Report, before: Mapping[str, int] | None, after: Mapping[str, int]) -> list[CensusCheck]:
    """One check per rewrite that replaced something: the ONNX op types it
    declares it removes must drop by as many as its sites removed."""
    from convify.core.registry import in_order  # noqa: PLC0415

    checks = []
    for spec in in_order():
        rows = [r for r in rep.replaced if r.rewrite == spec.name]
        if not rows or not spec.onnx_ops:
            continue
        removed = sum(spec.onnx_ops_removed(r) for r in rows)
        checks.append(_expect_fewer(spec.onnx_ops, before, after, removed,
                                    f"{len(rows)} {spec.name} site(s) replaced, {removed} op(s) removed"))
    return checks


def _expect_fewer(ops: tuple[str, ...], before: Mapping[str, int] | None, after: Mapping[str, int],
                  removed: int, why: str) -> CensusCheck:
    now = sum(after.get(op, 0) for op in ops)
    if before is None:
        return CensusCheck(ops, None, now, now, why + "; original census missing, not checked")
    was = sum(before.get(op, 0) for op in ops)
    return CensusCheck(ops, was, now, max(0, was - removed), why)
