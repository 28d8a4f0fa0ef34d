"""``convify rewrite``: rewrite a model and write a convify checkpoint (and ONNX)."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from convify.cli import onnx_files
from convify.cli.arguments import (given_shape, json_argument, model_arguments, onnx_arguments, onnx_names,
                                   output_arguments, rewrite_arguments, rewrite_keywords, verify_arguments)
from convify.cli.command import EXIT_FAILED, EXIT_OK, Command
from convify.cli.console import Progress, note, print_json
from convify.cli.models import export_model, load_and_rewrite, verify_rewrite
from convify.cli.outputs import CHECKPOINT, ONNX, check_suffix, note_random_weights, note_trust_code
from convify.cli.summary import headline, note_if_nothing, report_of, rewrite_summary, verification_dict

if TYPE_CHECKING:
    import torch.nn as nn

    from convify.io import ModelSource


def add_arguments(p: argparse.ArgumentParser) -> None:
    model_arguments(p)
    rewrite_arguments(p)
    output_arguments(p, "the convify checkpoint to write, a PyTorch file (a pickled module for --trust-pickle "
                        "input); a name ending in another format's suffix (.onnx, .safetensors, .npy...) is "
                        "refused before any work: --onnx writes the ONNX file")
    p.add_argument("--onnx", metavar="OUT.onnx", help="also export the rewritten model to ONNX (a name ending in "
                                                      "another format's suffix, such as .pt, is refused)")
    p.add_argument("--verify", action="store_true",
                   help="verify the rewrite through onnxruntime first; write nothing if it fails")
    verify_arguments(p)
    onnx_arguments(p)
    json_argument(p)


def run(args: argparse.Namespace) -> int:
    """Rewrite MODEL and write OUT (and OUT.onnx); never over an input, never a partial file."""
    if onnx_files.names_onnx(args):  # an ONNX file: the ONNX frontend, the same flags
        return onnx_files.run_rewrite(args)
    from convify import io as ck  # noqa: PLC0415

    shape = given_shape(args)
    options = rewrite_keywords(args)
    inputs = [args.model, args.weights]
    check_suffix(args.output, "-o", CHECKPOINT, f"--onnx {args.output} exports the rewritten model too")
    check_suffix(args.onnx, "--onnx", ONNX, "-o names the checkpoint")
    ck.check_output(args.output, force=args.force, inputs=inputs)
    if args.onnx:
        ck.check_output(args.onnx, force=args.force, inputs=inputs + [args.output])
    written: list[str] = []
    verification = None
    with Progress(3 + bool(args.verify)) as progress:
        src, shape, rewritten = load_and_rewrite(args, progress, shape, options, "rewriting")
        if args.verify:
            with progress.step("verifying through onnxruntime"):
                verification = verify_rewrite(src.model, rewritten, shape, args)
        if verification is None or verification.passed:
            with progress.step("writing"):
                written = _write(args, src, rewritten, options, shape, progress)
    if not written:
        _emit(args, src, rewritten, options, shape, verification=verification, written=[])
        note("verification failed: nothing written")
        return EXIT_FAILED
    note_if_nothing(report_of(rewritten, src), src, written=args.output)  # first: the copy is the news
    _emit(args, src, rewritten, options, shape, verification=verification, written=written)
    for path in written:
        note(f"wrote {path}")
    note_random_weights(src, args, " and ".join(written))
    if src.pickled:
        note(f"{args.output} is a whole pickled module (no recipe can rebuild an unnamed class): loading it "
             "runs code from the file and needs the same trust as its source (--trust-pickle, "
             "torch.load(..., weights_only=False)); " + _what_loading_needs(rewritten))
    note_trust_code(src, args.output)
    return EXIT_OK


def _write(args: argparse.Namespace, src: "ModelSource", rewritten: "nn.Module", options: dict[str, Any],
           shape: tuple[int, ...], progress: Progress) -> list[str]:
    """The checkpoint goes to a temp file; the ONNX export (itself atomic)
    runs before the rename, so a failed export leaves no checkpoint either."""
    import torch  # noqa: PLC0415

    from convify import io as ck  # noqa: PLC0415

    if src.pickled:  # its report as plain data, its guards as torch._assert: loading it needs no convify
        from convify.fx.portable import portable  # noqa: PLC0415

        payload: Any = portable(rewritten)
    else:  # the recipe: every pass the report records, those of an input checkpoint first
        recipe = ck.make_recipe(arch=src.arch, arch_kwargs=src.arch_kwargs, passes=ck.passes_of(rewritten))
        payload = ck.to_checkpoint(rewritten, recipe)
    written = [args.output]

    def write(tmp: Any) -> None:
        torch.save(payload, tmp)
        if args.onnx:
            progress.set("exporting to ONNX")
            export_model(rewritten, args.onnx, shape, exporter=args.exporter, opset=args.opset,
                         dynamic_spatial=args.dynamic_spatial, **onnx_names(args))
            written.append(args.onnx)

    ck.atomic_write(args.output, write, force=args.force, inputs=[args.model, args.weights])
    return written


def _what_loading_needs(rewritten: "nn.Module") -> str:
    from convify.fx.portable import convify_names  # noqa: PLC0415
    from convify.io.files import listing  # noqa: PLC0415

    names = convify_names(rewritten)
    if not names:
        return "it names no convify class or function: torch and the model's own code load it"
    return (f"it names convify ({listing(names)}), which no plain torch module replaces: loading it needs "
            "convify installed")


def _emit(args: argparse.Namespace, src: "ModelSource", rewritten: "nn.Module", options: dict[str, Any],
          shape: tuple[int, ...], *, verification: Any, written: list[str]) -> None:
    rep = report_of(rewritten, src)
    summary = rewrite_summary(src, rewritten, options, shape)
    if args.json:
        print_json({**summary, "report": rep.to_dict(), "verification": verification_dict(verification),
                    "written": written})
        return
    print(headline(summary))
    print(rep)
    if verification is not None:
        print()
        print(verification)


REWRITE = Command("rewrite", "rewrite a model and write a convify checkpoint (and ONNX)", add_arguments, run)
