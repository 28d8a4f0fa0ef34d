"""``convify verify``: rewrite in memory and verify it through onnxruntime; writes nothing."""
from __future__ import annotations

import argparse

from convify.cli.arguments import (given_shape, json_argument, model_arguments, onnx_arguments, rewrite_arguments,
                                   rewrite_keywords, verify_arguments)
from convify.cli.command import EXIT_FAILED, EXIT_OK, Command
from convify.cli.console import Progress, print_json
from convify.cli.models import load_and_rewrite, verify_rewrite
from convify.cli.summary import note_if_nothing, report_of, rewrite_summary, verification_dict


def add_arguments(p: argparse.ArgumentParser) -> None:
    model_arguments(p)
    rewrite_arguments(p)
    verify_arguments(p)
    onnx_arguments(p, spatial=False)
    json_argument(p)


def run(args: argparse.Namespace) -> int:
    """Rewrite in memory and verify the rewrite against MODEL; writes nothing."""
    shape = given_shape(args)
    options = rewrite_keywords(args)
    with Progress(3) as progress:
        src, shape, rewritten = load_and_rewrite(args, progress, shape, options, "rewriting in memory")
        with progress.step("verifying through onnxruntime"):
            verification = verify_rewrite(src.model, rewritten, shape, args)
    rep = report_of(rewritten, src)
    if args.json:
        print_json({**rewrite_summary(src, rewritten, options, shape), "report": rep.to_dict(),
                    "verification": verification_dict(verification)})
    else:
        print(verification)
    note_if_nothing(rep, src)
    return EXIT_OK if verification.passed else EXIT_FAILED


VERIFY = Command("verify", "rewrite in memory and verify it through onnxruntime; writes nothing", add_arguments,
                 run)
