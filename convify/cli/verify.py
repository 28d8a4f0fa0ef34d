"""``convify verify``: rewrite in memory and verify it through onnxruntime; writes nothing.

MODEL that is already rewritten (a convify checkpoint) is verified as it was
written, against the original it was made from: its recipe's architecture
with the original's weights (``--against FILE`` or ``--weights FILE``).
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from convify.cli import onnx_files
from convify.cli.arguments import (given_shape, json_argument, model_arguments, onnx_arguments, rewrite_arguments,
                                   rewrite_flags_given, rewrite_keywords, verify_arguments)
from convify.cli.command import EXIT_FAILED, EXIT_OK, Command
from convify.cli.console import Progress, print_json
from convify.cli.models import check_inputs_flags, load_model, resolve_shape, rewrite_model, verify_rewrite
from convify.cli.summary import note_if_nothing, report_of, rewrite_summary, verification_dict
from convify.errors import UsageError

if TYPE_CHECKING:
    from convify.io import ModelSource


def add_arguments(p: argparse.ArgumentParser) -> None:
    model_arguments(p)
    p.add_argument("--against", metavar="FILE",
                   help="with MODEL already rewritten (a convify checkpoint): the original to verify it against, "
                        "its weights (a state_dict for the checkpoint's architecture) or its model file; "
                        "--weights FILE says the same")
    rewrite_arguments(p)
    verify_arguments(p)
    onnx_arguments(p, spatial=False)
    json_argument(p)


def run(args: argparse.Namespace) -> int:
    """Rewrite MODEL in memory and verify the rewrite against MODEL; or verify
    MODEL, already rewritten, against its original. Writes nothing."""
    if onnx_files.names_onnx(args):  # an ONNX file: the ONNX frontend, the same flags
        return onnx_files.run_verify(args)
    shape = given_shape(args)
    options = rewrite_keywords(args)
    check_inputs_flags(args)
    against, flag = _against(args)
    with Progress(3) as progress:
        with progress.step("loading the model"):
            src = load_model(args)
            shape = resolve_shape(src, shape)
        if _rewritten(src):
            with progress.step("loading the original"):
                original = _original(src, against, flag, args)
            rewritten, options = src.model, None
        else:
            if against is not None:
                raise UsageError(f"{flag} {against}: {src.label} is not rewritten yet; verify rewrites it in memory "
                                 f"and compares with it, so leave {flag} out")
            with progress.step("rewriting in memory"):
                rewritten, original = rewrite_model(src, options, shape, args), src
        with progress.step("verifying through onnxruntime"):
            verification = verify_rewrite(original.model, rewritten, shape, args)
    rep = report_of(rewritten, original)
    if args.json:
        print_json({**rewrite_summary(original, rewritten, options, shape), "model": src.label,
                    "against": None if original is src else original.label, "report": rep.to_dict(),
                    "verification": verification_dict(verification)})
    else:
        print(verification)
    note_if_nothing(rep, src)
    return EXIT_OK if verification.passed else EXIT_FAILED


def _against(args: argparse.Namespace) -> tuple[str | None, str]:
    """The original's file and the flag that named it. ``--weights`` without
    ``--arch`` beside MODEL names it too (MODEL then brings its architecture),
    so it is taken out of what loads MODEL."""
    if args.weights is None or args.model is None or args.arch is not None:
        return args.against, "--against"
    if args.against is not None:
        raise UsageError("--weights and --against both name the original: give it once")
    weights, args.weights = args.weights, None
    return weights, "--weights"


def _rewritten(src: "ModelSource") -> bool:
    from convify.core.report import report  # noqa: PLC0415

    return bool(report(src.model).replaced)


def _original(src: "ModelSource", against: str | None, flag: str, args: argparse.Namespace) -> "ModelSource":
    """The original ``src`` was rewritten from, read from ``against``; refused
    without one, and with rewrite flags (``src`` is verified as it is)."""
    if against is None:
        source = f"its recipe's architecture ({src.arch}) with " if src.arch is not None else ""
        raise UsageError(f"{src.label} is already rewritten: verifying it needs the original to compare with, "
                         f"{source}the original's weights: pass --against FILE (a weights file or the original "
                         "model file)")
    given = rewrite_flags_given(args)
    if given:
        raise UsageError(f"{src.label} is already rewritten and is verified as it was written: leave out "
                         f"{', '.join(given)} (to rewrite it further, write it with convify rewrite first)")
    from convify.io import open_original  # noqa: PLC0415

    return open_original(src, against, trust_pickle=args.trust_pickle, trust_code=args.trust_code)


VERIFY = Command("verify", "rewrite in memory and verify it through onnxruntime (a model already rewritten: "
                 "verify it against its original, --against FILE); writes nothing", add_arguments, run)
