"""``convify export``: export a model or convify checkpoint, as it is, to ONNX."""
from __future__ import annotations

import argparse

from convify.cli.arguments import given_shape, model_arguments, onnx_arguments, onnx_names, output_arguments
from convify.cli.command import EXIT_OK, Command
from convify.cli.console import Progress, note
from convify.cli.models import export_model, load_model, resolve_shape


def add_arguments(p: argparse.ArgumentParser) -> None:
    model_arguments(p)
    output_arguments(p, "the .onnx file to write")
    onnx_arguments(p)


def run(args: argparse.Namespace) -> int:
    """Export MODEL as it is (typically a convify checkpoint) to one ONNX file."""
    from convify import io as ck  # noqa: PLC0415

    shape = given_shape(args)
    ck.check_output(args.output, force=args.force, inputs=[args.model, args.weights])
    with Progress(2) as progress:
        with progress.step("loading the model"):
            src = load_model(args)
            shape = resolve_shape(src, shape)
        with progress.step("exporting to ONNX"):
            path = export_model(src.model, args.output, shape, dynamic_spatial=args.dynamic_spatial,
                                opset=args.opset, exporter=args.exporter, **onnx_names(args))
    note(f"wrote {path}")
    return EXIT_OK


EXPORT = Command("export", "export a model or convify checkpoint to ONNX", add_arguments, run)
