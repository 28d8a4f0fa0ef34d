"""``convify export``: export a model or convify checkpoint, as it is, to ONNX."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from convify.cli.arguments import given_shape, model_arguments, onnx_arguments, onnx_names, output_arguments
from convify.cli.command import EXIT_OK, Command
from convify.cli.console import Progress, note
from convify.cli.models import export_model, load_model, resolve_shape
from convify.cli.outputs import ONNX, check_suffix, note_random_weights
from convify.wording import counted

if TYPE_CHECKING:
    from convify.io import ModelSource

_DESCRIPTION = ("export MODEL to ONNX as it is: nothing is rewritten. Give it a convify checkpoint (from `convify "
                "rewrite`); a plain model is exported unchanged, with a note saying so. `convify rewrite MODEL -o "
                "OUT.pt --onnx OUT.onnx` rewrites and exports in one run.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = _DESCRIPTION
    model_arguments(p)
    output_arguments(p, "the ONNX file to write; a name ending in another format's suffix (.pt, .pth, "
                        ".safetensors...) is refused before any work")
    onnx_arguments(p)


def run(args: argparse.Namespace) -> int:
    """Export MODEL as it is (typically a convify checkpoint) to one ONNX file."""
    from convify import io as ck  # noqa: PLC0415

    check_suffix(args.output, "-o", ONNX, "a checkpoint is what `convify rewrite -o` writes")
    shape = given_shape(args)
    ck.check_output(args.output, force=args.force, inputs=[args.model, args.weights])
    with Progress(2) as progress:
        with progress.step("loading the model"):
            src = load_model(args)
            shape = resolve_shape(src, shape)
        with progress.step("exporting to ONNX"):
            path = export_model(src.model, args.output, shape, dynamic_spatial=args.dynamic_spatial,
                                opset=args.opset, exporter=args.exporter, **onnx_names(args))
    _note_if_not_rewritten(src, str(path))
    note(f"wrote {path}")
    note_random_weights(src, args, str(path))
    return EXIT_OK


def _note_if_not_rewritten(src: "ModelSource", path: str) -> None:
    """Say plainly that a model no convify rewrite has touched went out unchanged, with the ONNX ops the rewrites
    would have removed, and the command that rewrites before exporting."""
    from convify.core.registry import in_order  # noqa: PLC0415
    from convify.core.report import report  # noqa: PLC0415
    from convify.export.census import op_census  # noqa: PLC0415  (onnx)

    if report(src.model).passes:
        return  # a rewritten model: exported as its recipe made it
    census = op_census(path)
    left = [counted(census[op], f"{op} node") for spec in in_order() for op in spec.onnx_ops if census.get(op)]
    still = f" ({path} still has {', '.join(left)})" if left else ""
    note(f"exported {src.label} as it is: nothing was rewritten{still}; to export the all-convolutional model, "
         f"run `convify rewrite` with the same model arguments and --onnx {path} (`convify inspect` shows what it "
         "would replace)")


EXPORT = Command("export", "export a model or convify checkpoint to ONNX as it is (no rewrite)", add_arguments, run)
