"""``convify inspect|rewrite|verify MODEL.onnx``: the commands on ONNX files.

The same rewrite flags as for PyTorch models (``--pool exact --exact-form
separable --ungrouped``, ``--head``, ``--only``, ``--skip``); the ONNX
frontend (:mod:`convify.onnx`) applies them to the graph, so no PyTorch code
is needed. ``rewrite -o OUT.onnx`` writes ONNX (its external data beside it
when the input had some), ``verify`` runs both graphs in onnxruntime. Flags
that load or shape a PyTorch model (``--arch``, ``--weights``,
``--input-shape``, calibration, ``--onnx``, the export flags) are refused by
name, before any work.

    convify rewrite model.onnx --pool exact --exact-form separable --ungrouped -o allconv.onnx
    convify verify allconv.onnx --against model.onnx
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from convify.cli.arguments import rewrite_keywords
from convify.cli.command import EXIT_FAILED, EXIT_OK
from convify.cli.console import Progress, note, print_json
from convify.cli.outputs import ONNX, check_suffix
from convify.cli.summary import verification_dict
from convify.core.report import SkipCause
from convify.errors import CheckpointError, ModelFileError, UsageError
from convify.wording import counted

#: Flags (the ``argparse`` dest, then the flag) that mean nothing for an ONNX model.
_TORCH_ONLY = (("arch", "--arch"), ("arch_kwargs", "--arch-kwargs"), ("weights", "--weights"),
               ("trust_pickle", "--trust-pickle"), ("trust_code", "--trust-code"), ("input_shape", "--input-shape"),
               ("calibration", "--calibration"), ("reconstruct", "--reconstruct"),
               ("reconstruct_steps", "--reconstruct-steps"), ("reconstruct_lr", "--reconstruct-lr"),
               ("onnx", "--onnx"), ("exporter", None), ("opset", "--opset"), ("dynamic_spatial", "--dynamic-spatial"),
               ("input_names", "--input-names"), ("output_names", "--output-names"), ("inputs", "--inputs"))



def names_onnx(args: argparse.Namespace) -> bool:
    """Whether MODEL is an ONNX file (the commands hand it to this module)."""
    from convify.onnx.detect import is_onnx  # noqa: PLC0415

    return args.model is not None and is_onnx(args.model)


def refuse_torch_flags(args: argparse.Namespace) -> None:
    given = [flag for dest, flag in _TORCH_ONLY if flag and _given(getattr(args, dest, None))]
    if given:
        raise UsageError(f"{args.model} is an ONNX model: {', '.join(given)} "
                         f"{'applies' if len(given) == 1 else 'apply'} to PyTorch models only; leave "
                         f"{'it' if len(given) == 1 else 'them'} out (the graph's declared shapes are used)")


def _given(value: Any) -> bool:
    return value is not None and value is not False and value != []


def _options(args: argparse.Namespace) -> list[Any]:
    from convify.core import registry  # noqa: PLC0415

    keywords = rewrite_keywords(args)
    chosen = [o for spec in registry.in_order() if (o := spec.options_from_keywords(keywords)) is not None]
    if not chosen:
        raise UsageError("--pool none and --head none leave nothing to rewrite")
    return chosen


def _rewrite(args: argparse.Namespace, progress: Progress) -> tuple[Any, Any]:
    """MODEL read and rewritten: the ``onnx_ir`` model and its report (this run's passes)."""
    from convify.onnx import read_model, report_of, rewrite_onnx  # noqa: PLC0415

    with progress.step("reading the model"):
        model = read_model(args.model)
        before = report_of(model)
    with progress.step("rewriting"):
        rewritten = rewrite_onnx(model, _options(args), only=args.only, skip=args.skip)
    rep = report_of(rewritten).since(before)
    _refuse_unsized(rep, args.model)
    return rewritten, rep


def _refuse_unsized(rep: Any, model: str) -> None:
    """The one skip the command line refuses (exit 2): a site needing channels the graph does not declare."""
    unsized = [s for s in rep.skipped if s.cause is SkipCause.UNSIZED]
    if unsized:
        more = f", and {counted(len(unsized) - 1, 'more such site')}" if len(unsized) > 1 else ""
        raise ModelFileError(f"{model}: {unsized[0].name} ({unsized[0].op}) {unsized[0].reason.split('; ')[0]}; "
                             "fix the input's dimensions first (python -m onnxruntime.tools.make_dynamic_shape_fixed)"
                             f"{more}")


def _summary(args: argparse.Namespace, rep: Any) -> dict[str, Any]:
    return {"model": str(args.model), "rewrite": rewrite_keywords(args), "replaced": len(rep.replaced),
            "nothing_to_rewrite": not rep.replaced}


def _note_if_nothing(rep: Any, args: argparse.Namespace, written: str | None = None) -> None:
    if not rep.replaced:
        copy = f"; {written} holds the model unchanged" if written else ""
        note(f"nothing to rewrite in {args.model}: no max pooling or Linear head was replaced "
             f"({counted(len(rep.skipped), 'site')} skipped, see the report){copy}")


def run_inspect(args: argparse.Namespace) -> int:
    refuse_torch_flags(args)
    with Progress(2) as progress:
        _, rep = _rewrite(args, progress)
    _note_if_nothing(rep, args)
    if args.json:
        print_json({**_summary(args, rep), "report": rep.to_dict()})
    else:
        print(rep)
    note("dry run: nothing written")
    return EXIT_OK


def run_rewrite(args: argparse.Namespace) -> int:
    """Rewrite MODEL.onnx into OUT.onnx: never over the input, never a partial file."""
    from convify import io as ck  # noqa: PLC0415

    refuse_torch_flags(args)
    check_suffix(args.output, "-o", ONNX, "an ONNX model is rewritten into an ONNX file")
    out = ck.check_output(args.output, force=args.force, inputs=[args.model])
    verification = None
    with Progress(3 + bool(args.verify)) as progress:
        rewritten, rep = _rewrite(args, progress)
        if args.verify:
            with progress.step("verifying through onnxruntime"):
                verification = _verify(args.model, rewritten, args)
        if verification is not None and not verification.passed:
            _emit(args, rep, verification, written=[])
            note("verification failed: nothing written")
            return EXIT_FAILED
        with progress.step("writing"):
            written = _write(rewritten, out, args.force)
    _note_if_nothing(rep, args, written=str(out))
    _emit(args, rep, verification, written=[str(p) for p in written])
    for path in written:
        note(f"wrote {path}")
    return EXIT_OK


def _write(model: Any, out: Path, force: bool) -> list[Path]:
    """Write into a temp folder beside ``out``, then move the file (and its external data) into place."""
    from convify.onnx import write_model  # noqa: PLC0415

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        data = write_model(model, tmp / out.name)
        if out.exists() and not force:  # appeared while we worked
            raise CheckpointError(f"{out} exists: pass {{force}} to replace it")
        written = []
        if data is not None:
            os.replace(data, out.with_name(data.name))
            written.append(out.with_name(data.name))
        os.replace(tmp / out.name, out)
        return [out, *written]
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)


def _emit(args: argparse.Namespace, rep: Any, verification: Any, written: list[str]) -> None:
    if args.json:
        print_json({**_summary(args, rep), "report": rep.to_dict(), "verification": verification_dict(verification),
                    "written": written})
        return
    print(rep)
    if verification is not None:
        print(verification)


def _verify(original: Any, rewritten: Any, args: argparse.Namespace) -> Any:
    from convify.export.verify import verify  # noqa: PLC0415

    if args.inputs_count is not None:
        raise UsageError("--inputs-count: an ONNX model is verified on 8 seeded random inputs at its declared "
                         "shapes; leave --inputs-count out")
    return verify(original, rewritten, provider=args.provider, atol=args.atol, rtol=args.rtol,
                  min_agreement=args.min_agreement)


def run_verify(args: argparse.Namespace) -> int:
    """Rewrite MODEL.onnx in memory and verify it; or verify MODEL.onnx, already rewritten, ``--against`` its
    original."""
    from convify.onnx import report_of  # noqa: PLC0415

    against = getattr(args, "against", None)
    refuse_torch_flags(args)
    with Progress(3) as progress:
        if report_of(args.model).replaced:
            if against is None:
                raise UsageError(f"{args.model} is already rewritten: verifying it needs the original to compare "
                                 "with: pass --against ORIGINAL.onnx")
            with progress.step("verifying through onnxruntime"):
                verification = _verify(against, args.model, args)
            rep = report_of(args.model)
        else:
            if against is not None:
                raise UsageError(f"--against {against}: {args.model} is not rewritten yet; verify rewrites it in "
                                 "memory and compares with it, so leave --against out")
            rewritten, rep = _rewrite(args, progress)
            with progress.step("verifying through onnxruntime"):
                verification = _verify(args.model, rewritten, args)
    if args.json:
        print_json({**_summary(args, rep), "against": against, "report": rep.to_dict(),
                    "verification": verification_dict(verification)})
    else:
        print(verification)
    _note_if_nothing(rep, args)
    return EXIT_OK if verification.passed else EXIT_FAILED
