"""``convify inspect``: a dry run that prints what would be replaced and skipped."""
from __future__ import annotations

import argparse

from convify.cli import onnx_files
from convify.cli.arguments import given_shape, json_argument, model_arguments, rewrite_arguments, rewrite_keywords
from convify.cli.command import EXIT_OK, Command
from convify.cli.console import Progress, note, print_json
from convify.cli.models import load_and_rewrite
from convify.cli.summary import headline, note_if_nothing, report_of, rewrite_summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    model_arguments(p)
    rewrite_arguments(p)
    json_argument(p)


def run(args: argparse.Namespace) -> int:
    """A dry run: rewrite in memory, print what would be replaced and skipped."""
    if onnx_files.names_onnx(args):  # an ONNX file: the ONNX frontend, the same flags
        return onnx_files.run_inspect(args)
    shape = given_shape(args)
    options = rewrite_keywords(args)
    with Progress(2) as progress:
        src, shape, rewritten = load_and_rewrite(args, progress, shape, options, "rewriting in memory")
    rep = report_of(rewritten, src)
    summary = rewrite_summary(src, rewritten, options, shape)
    note_if_nothing(rep, src)
    if args.json:
        print_json({**summary, "report": rep.to_dict()})
    else:
        print(headline(summary))
        print(rep)
    note("dry run: nothing written")
    return EXIT_OK


INSPECT = Command("inspect", "dry run: what would be rewritten and skipped, with shapes", add_arguments, run)
