"""The ``convify`` command line (also ``python -m convify``).

::

    convify inspect --arch torchvision:resnet18 --weights resnet18.pth
    convify rewrite --arch torchvision:resnet18 --weights resnet18.pth -o allconv.pt --onnx allconv.onnx
    convify rewrite my-hf-resnet/ -o allconv.pt        # a Hugging Face folder (pip install -e '.[hf]')
    convify verify allconv.pt --head none
    convify export allconv.pt -o allconv.onnx --dynamic-spatial
    convify scan --arch torchvision:resnet18 --weights resnet18.pth slide.tiff -o scores.npy --png heat.png

Exit codes: 0 success (also when there was nothing to rewrite), 1 a failed
rewrite or verification, 2 bad usage or unreadable input. Errors are one line
on stderr (``--debug`` adds the traceback); reports go to stdout, notes to
stderr, so ``--json`` output can be piped.

Each subcommand is one ``Command`` row in :data:`COMMANDS`: a function that
adds its arguments and one that runs it. The rewrite flags (``--pool``,
``--init``, ``--head``, ``--dense``...) are made from the options each
registered rewrite declares, so a new rewrite brings its flags with it. Heavy
modules (torch, the rewrite engine, onnx, onnxruntime) are imported only for
the command that runs: ``convify --help`` imports none of them.

Library errors name parameters in the library's terms; :data:`FLAGS` says
how the command line spells them.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from convify.errors import CheckpointError, ConvifyError, ExampleInputError, RewriteError, UsageError, one_line
from convify.recovery import SYNTHETIC

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

    from convify.core.report import Report
    from convify.io import ModelSource, RecipePass

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

#: How the command line spells the parameters library errors name (see convify.errors.PARAMETERS).
FLAGS = {
    "force": "--force", "trust_pickle": "--trust-pickle", "trust_code": "--trust-code", "path": "MODEL",
    "weights": "--weights", "arch": "--arch", "arch_kwargs": "--arch-kwargs", "input_shape": "--input-shape",
    "calibration": "--calibration DIR", "precision": "--precision", "device": "--device",
    "no_compile": "leave out --compile",
}


# --------------------------------------------------------------------------- arguments shared by commands


def _model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (a file, a Hugging Face model folder, or --arch with optional --weights)")
    g.add_argument("model", nargs="?", metavar="MODEL",
                   help="a convify checkpoint, a pickled nn.Module (with --trust-pickle), a Hugging Face model "
                        "folder (config.json and model.safetensors; needs transformers: pip install -e '.[hf]'), "
                        "or with --arch the weights file")
    g.add_argument("--arch", metavar="SPEC",
                   help="torchvision:NAME, timm:NAME or package.module:factory")
    g.add_argument("--arch-kwargs", action="append", metavar="KEY=VALUE",
                   help="a builder argument, the value a Python literal (repeatable): num_classes=10")
    g.add_argument("--weights", metavar="FILE",
                   help="a state_dict for --arch: .pt/.pth (read with weights_only=True) or .safetensors")
    g.add_argument("--trust-pickle", action="store_true",
                   help="allow a file holding pickled Python objects (a whole nn.Module); loading it runs "
                        "code from the file")
    g.add_argument("--trust-code", action="store_true",
                   help="allow a convify checkpoint whose recipe imports package.module:factory")
    g.add_argument("--input-shape", metavar="N,C,H,W",
                   help="example input shape (default: the checkpoint's, else worked out from the model)")


def _rewrite_arguments(p: argparse.ArgumentParser) -> None:
    """One group of flags per registered rewrite, made from its options."""
    from convify.core.options import choices_of, help_of  # noqa: PLC0415
    from convify.core.registry import in_order  # noqa: PLC0415  (the specs import torch)

    for spec in in_order():
        g = p.add_argument_group(f"{spec.name} rewrite: {spec.summary} (defaults: those of convify.convify)")
        for f in dataclasses.fields(spec.Options):
            key = spec.keyword_of(f.name)
            flag = "--" + key.replace("_", "-")
            helptext, choices = help_of(f), choices_of(f)
            if isinstance(f.default, bool):
                g.add_argument(flag, dest=key, action="store_true", help=helptext)
            elif choices:
                extra = ["none"] if f.name == "mode" else []
                g.add_argument(flag, dest=key, choices=[*(c for c in choices if c is not None), *extra],
                               default=f.default if f.default is not None else "none",
                               help=f"{helptext} (default: {f.default or 'none'}"
                                    f"{'; none: leave it out' if extra else ''})")
            else:
                g.add_argument(flag, dest=key, type=type(f.default), default=f.default, help=helptext)
    g = p.add_argument_group("sites and calibration")
    g.add_argument("--only", action="append", metavar="GLOB", help="rewrite only sites matching GLOB (repeatable)")
    g.add_argument("--skip", action="append", metavar="GLOB", help="leave sites matching GLOB alone (repeatable)")
    g.add_argument("--calibration", metavar="DIR",
                   help="with --init fit or --reconstruct: a folder of images (flat, or class subfolders), or "
                        "the word 'synthetic': images synthesized from the model's BatchNorm statistics "
                        "(no data needed; write ./synthetic for a folder of that name)")
    g.add_argument("--calibration-images", type=int, default=1024, metavar="N",
                   help="use at most N calibration images (default: 1024)")
    g = p.add_argument_group("reconstruction (convify.reconstruct: train each pooling site's block toward the "
                             "original's activations on the calibration images, no labels)")
    g.add_argument("--reconstruct", action="store_true", help="reconstruct after the rewrite (needs --calibration)")
    g.add_argument("--reconstruct-steps", type=int, metavar="N",
                   help="Adam steps per block (default: convify.reconstruct's, 500)")
    g.add_argument("--reconstruct-lr", type=float, metavar="LR",
                   help="Adam learning rate (default: convify.reconstruct's, 0.001)")


def _output_arguments(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("-o", "--output", required=True, metavar="OUT", help=what)
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def _verify_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("verification (export to ONNX, run in onnxruntime, compare)")
    g.add_argument("--provider", choices=["cpu", "cuda"], default="cpu", help="onnxruntime provider (default: cpu)")
    g.add_argument("--min-agreement", type=float, metavar="FRACTION",
                   help="pass a rewrite that is not exact only if top-1 agreement reaches FRACTION")
    g.add_argument("--atol", type=float, help="absolute tolerance (default: convify.verify's)")
    g.add_argument("--rtol", type=float, help="relative tolerance (default: convify.verify's)")


def _onnx_arguments(p: argparse.ArgumentParser, spatial: bool = True) -> None:
    g = p.add_argument_group("ONNX export")
    if spatial:
        g.add_argument("--dynamic-spatial", action=argparse.BooleanOptionalAction, default=None,
                       help="make height and width dynamic (default: yes for a --dense model, no otherwise)")
    g.add_argument("--exporter", choices=["dynamo", "legacy"], default="dynamo",
                   help="torch's current exporter (default; falls back to legacy on failure) or the legacy one")
    g.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")


def _json_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")


# --------------------------------------------------------------------------- inspect


def _add_inspect(p: argparse.ArgumentParser) -> None:
    _model_arguments(p)
    _rewrite_arguments(p)
    _json_argument(p)


def run_inspect(args: argparse.Namespace) -> int:
    """A dry run: rewrite in memory, print what would be replaced and skipped."""
    shape = _given_shape(args)
    options = _rewrite_keywords(args)
    with _Progress(2) as progress:
        src, shape, rewritten = _load_and_rewrite(args, progress, shape, options, "rewriting in memory")
    rep = _report(rewritten, src)
    summary = _summary(src, rewritten, options, shape)
    if args.json:
        _print_json({**summary, "report": rep.to_dict()})
    else:
        print(_headline(summary))
        print(rep)
    _note("dry run: nothing written")
    _note_if_nothing(rep, src)
    return EXIT_OK


# --------------------------------------------------------------------------- rewrite


def _add_rewrite(p: argparse.ArgumentParser) -> None:
    _model_arguments(p)
    _rewrite_arguments(p)
    _output_arguments(p, "the convify checkpoint to write (a pickled module for --trust-pickle input)")
    p.add_argument("--onnx", metavar="OUT.onnx", help="also export the rewritten model to ONNX")
    p.add_argument("--verify", action="store_true",
                   help="verify the rewrite through onnxruntime first; write nothing if it fails")
    _verify_arguments(p)
    _onnx_arguments(p)
    _json_argument(p)


def run_rewrite(args: argparse.Namespace) -> int:
    """Rewrite MODEL and write OUT (and OUT.onnx); never over an input, never a partial file."""
    from convify import io as ck  # noqa: PLC0415

    shape = _given_shape(args)
    options = _rewrite_keywords(args)
    inputs = [args.model, args.weights]
    ck.check_output(args.output, force=args.force, inputs=inputs)
    if args.onnx:
        ck.check_output(args.onnx, force=args.force, inputs=inputs + [args.output])
    written: list[str] = []
    verification = None
    with _Progress(3 + bool(args.verify)) as progress:
        src, shape, rewritten = _load_and_rewrite(args, progress, shape, options, "rewriting")
        if args.verify:
            with progress.step("verifying through onnxruntime"):
                verification = _verify(src.model, rewritten, shape, args)
        if verification is None or verification.passed:
            with progress.step("writing"):
                written = _write(args, src, rewritten, options, shape, progress)
    if not written:
        _emit(args, src, rewritten, options, shape, verification=verification, written=[])
        _note("verification failed: nothing written")
        return EXIT_FAILED
    _emit(args, src, rewritten, options, shape, verification=verification, written=written)
    for path in written:
        _note(f"wrote {path}")
    if src.pickled:
        _note(f"{args.output} is a whole pickled module (no recipe can rebuild an unnamed class): loading it "
              "runs code from the file and needs the same trust as its source (--trust-pickle, "
              "torch.load(..., weights_only=False))")
    _note_if_nothing(_report(rewritten, src), src)
    return EXIT_OK


def _write(args: argparse.Namespace, src: "ModelSource", rewritten: "nn.Module", options: dict[str, Any],
           shape: tuple[int, ...], progress: "_Progress") -> list[str]:
    """The checkpoint goes to a temp file; the ONNX export (itself atomic)
    runs before the rename, so a failed export leaves no checkpoint either."""
    import torch  # noqa: PLC0415

    from convify import io as ck  # noqa: PLC0415

    if src.pickled:
        payload: Any = rewritten
    else:  # the recipe: every pass the report records, those of an input checkpoint first
        recipe = ck.make_recipe(arch=src.arch, arch_kwargs=src.arch_kwargs, passes=ck.passes_of(rewritten))
        payload = ck.to_checkpoint(rewritten, recipe)
    written = [args.output]

    def write(tmp: Any) -> None:
        torch.save(payload, tmp)
        if args.onnx:
            progress.set("exporting to ONNX")
            _export(rewritten, args.onnx, shape, exporter=args.exporter, opset=args.opset,
                    dynamic_spatial=args.dynamic_spatial)
            written.append(args.onnx)

    ck.atomic_write(args.output, write, force=args.force, inputs=[args.model, args.weights])
    return written


def _emit(args: argparse.Namespace, src: "ModelSource", rewritten: "nn.Module", options: dict[str, Any],
          shape: tuple[int, ...], *, verification: Any, written: list[str]) -> None:
    rep = _report(rewritten, src)
    summary = _summary(src, rewritten, options, shape)
    if args.json:
        _print_json({**summary, "report": rep.to_dict(), "verification": _verification_dict(verification),
                     "written": written})
        return
    print(_headline(summary))
    print(rep)
    if verification is not None:
        print()
        print(verification)


# --------------------------------------------------------------------------- export


def _add_export(p: argparse.ArgumentParser) -> None:
    _model_arguments(p)
    _output_arguments(p, "the .onnx file to write")
    _onnx_arguments(p)


def run_export(args: argparse.Namespace) -> int:
    """Export MODEL as it is (typically a convify checkpoint) to one ONNX file."""
    from convify import io as ck  # noqa: PLC0415

    shape = _given_shape(args)
    ck.check_output(args.output, force=args.force, inputs=[args.model, args.weights])
    with _Progress(2) as progress:
        with progress.step("loading the model"):
            src = _open_model(args)
            shape = _resolve_shape(src, shape)
        with progress.step("exporting to ONNX"):
            path = _export(src.model, args.output, shape, dynamic_spatial=args.dynamic_spatial,
                           opset=args.opset, exporter=args.exporter)
    _note(f"wrote {path}")
    return EXIT_OK


def _export(model: "nn.Module", path: str, shape: tuple[int, ...], **options: Any) -> Any:
    from convify import export_onnx  # noqa: PLC0415  (onnx and the exporter load here, not before)

    return export_onnx(model, path, _random_input(model, shape), **options)


# --------------------------------------------------------------------------- verify


def _add_verify(p: argparse.ArgumentParser) -> None:
    _model_arguments(p)
    _rewrite_arguments(p)
    _verify_arguments(p)
    _onnx_arguments(p, spatial=False)
    _json_argument(p)


def run_verify(args: argparse.Namespace) -> int:
    """Rewrite in memory and verify the rewrite against MODEL; writes nothing."""
    shape = _given_shape(args)
    options = _rewrite_keywords(args)
    with _Progress(3) as progress:
        src, shape, rewritten = _load_and_rewrite(args, progress, shape, options, "rewriting in memory")
        with progress.step("verifying through onnxruntime"):
            verification = _verify(src.model, rewritten, shape, args)
    rep = _report(rewritten, src)
    if args.json:
        _print_json({**_summary(src, rewritten, options, shape), "report": rep.to_dict(),
                     "verification": _verification_dict(verification)})
    else:
        print(verification)
    _note_if_nothing(rep, src)
    return EXIT_OK if verification.passed else EXIT_FAILED


def _verify(original: "nn.Module", rewritten: "nn.Module", shape: tuple[int, ...], args: argparse.Namespace) -> Any:
    from convify.export.verify import verify  # noqa: PLC0415  (onnx, onnxruntime)

    return verify(original, rewritten, _random_input(original, shape), provider=args.provider,
                  atol=args.atol, rtol=args.rtol, min_agreement=args.min_agreement, exporter=args.exporter,
                  opset=args.opset)


def _verification_dict(verification: Any) -> dict[str, Any] | None:
    if verification is None:
        return None
    to_dict = getattr(verification, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    return {"passed": bool(verification.passed), "table": str(verification)}


# --------------------------------------------------------------------------- scan


def _add_scan(p: argparse.ArgumentParser) -> None:
    _model_arguments(p)
    p.add_argument("image", metavar="IMAGE", help="a PNG, JPEG or TIFF image of any size")
    _output_arguments(p, "the score map to write: a .npy file, float32, shape (1, K, H', W')")
    g = p.add_argument_group("scanning (convify.dense_map)")
    g.add_argument("--png", metavar="FILE.png",
                   help="also write a heat map over the image: each position in its top class's colour")
    g.add_argument("--class", dest="class_index", type=int, metavar="K",
                   help="with --png: the probability map of class K instead of the top class")
    g.add_argument("--tile", type=int, metavar="N",
                   help="tile side in input pixels (default: the largest that fits in memory)")
    g.add_argument("--batch-size", type=int, metavar="N", help="tiles per forward pass (default: what fits)")
    g.add_argument("--normalize", choices=["none", "imagenet"], default="none",
                   help="pixels are scaled to [0, 1]; imagenet: then normalized with ImageNet's mean and std")
    g.add_argument("--device", help="torch device for the model (default: cpu)")
    g.add_argument("--onnx", action="store_true",
                   help="run the tiles through onnxruntime (the model exported with dynamic height and width)")
    g.add_argument("--provider", choices=["cpu", "cuda"], default="cpu",
                   help="with --onnx: onnxruntime provider (default: cpu)")
    _json_argument(p)


_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def run_scan(args: argparse.Namespace) -> int:
    """Score every window of IMAGE with MODEL made dense, in exact tiles; write OUT.npy (and a PNG)."""
    import numpy as np  # noqa: PLC0415

    from convify import io as ck  # noqa: PLC0415
    from convify.dense import heatmap, is_dense, load_image, scan  # noqa: PLC0415
    from convify.errors import DataError  # noqa: PLC0415

    inputs = [args.model, args.weights, args.image]
    ck.check_output(args.output, force=args.force, inputs=inputs)
    if args.png:
        ck.check_output(args.png, force=args.force, inputs=inputs + [args.output])
    if not os.path.isfile(args.image):
        raise UsageError(f"{args.image}: no such image file")
    shape = _given_shape(args)
    with _Progress(2) as progress:
        with progress.step("loading the model"):
            src = _open_model(args)
            shape = _resolve_shape(src, shape)
            try:  # read before any conversion: a bad image fails fast
                image = load_image(args.image, shape[1] if len(shape) == 4 and shape[1] in (1, 3) else 3)
            except DataError as e:
                raise UsageError(str(e)) from e
        model = src.model.eval()
        converted = not is_dense(model)
        with progress.step("converting the head (dense=True)"):
            if converted:
                from convify import replace_linear_head  # noqa: PLC0415

                model = replace_linear_head(model, _random_input(model, shape), dense=True)
    result = scan(model, image, tile=args.tile, batch_size=args.batch_size, device=args.device,
                  progress=not args.json, onnx=True if args.onnx else None, provider=args.provider,
                  normalize=_IMAGENET if args.normalize == "imagenet" else None)
    scores = result.scores
    assert scores is not None  # one process: rank 0
    written = [args.output]

    def write(tmp: Any) -> None:
        with open(tmp, "wb") as f:
            np.save(f, scores.numpy().astype(np.float32))
        if args.png:
            picture = heatmap(result.image, scores, result.plan.geometry, args.class_index)
            ck.atomic_write(args.png, lambda t: picture.save(t, format="PNG"), force=args.force,
                            inputs=inputs + [args.output])
            written.append(args.png)

    if args.class_index is not None and not 0 <= args.class_index < scores.shape[1]:
        raise UsageError(f"--class {args.class_index}: the map has {scores.shape[1]} classes "
                         f"(0 .. {scores.shape[1] - 1})")
    ck.atomic_write(args.output, write, force=args.force, inputs=inputs)
    summary = _scan_summary(src.label, result)
    if args.json:
        _print_json({**summary, "written": written})
    else:
        print(_scan_headline(summary))
    if converted:  # said after success, so that an error stays one line
        _note(f"{src.label} is not dense: converted its head with replace_linear_head(dense=True)")
    for path in written:
        _note(f"wrote {path}")
    return EXIT_OK


def _scan_summary(label: str, result: Any) -> dict[str, Any]:
    plan = result.plan
    return {"model": label, "image": list(result.image.shape), "map": list(result.scores.shape),
            "geometry": plan.geometry.to_dict(), "tile": list(plan.tile), "tiles": len(plan.tiles),
            "batch_size": result.batch_size, "halo_overhead": round(plan.overhead, 4), "runner": result.runner}


def _scan_headline(s: dict[str, Any]) -> str:
    g = s["geometry"]
    return (f"{s['model']}  image {_shape_text(s['image'])} -> map {_shape_text(s['map'])}  stride "
            f"{_shape_text(g['stride'])}, receptive field {_shape_text(g['size'])}, offset "
            f"{','.join(map(str, g['offset']))}  {s['tiles']} tiles of {_shape_text(s['tile'])} (halo overhead "
            f"{s['halo_overhead']:.2f}x) on {s['runner']}")


# --------------------------------------------------------------------------- demo


def run_demo(args: argparse.Namespace) -> int:
    """Rewrite, export and verify a small model, printing each step."""
    try:
        from convify import demo  # noqa: PLC0415
    except ModuleNotFoundError as e:
        if e.name != "convify.demo":
            raise
        raise UsageError("the demo is not part of this installation of convify") from e
    code = demo.main()
    return EXIT_OK if code is None else int(code)


# --------------------------------------------------------------------------- distill


def _add_distill(p: argparse.ArgumentParser) -> None:
    from convify.recovery.distillation import \
        PRECISIONS  # noqa: PLC0415  (imports torch: only when the command is distill)

    p.add_argument("model", metavar="REWRITTEN", help="the rewritten model: a convify checkpoint (from `convify "
                                                      "rewrite`), or a pickled module with --trust-pickle")
    p.add_argument("--teacher", required=True, metavar="MODEL",
                   help="the original model: a state_dict of REWRITTEN's architecture (.pt/.pth/.safetensors), "
                        "a convify checkpoint, or a pickled module with --trust-pickle")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="training images: an ImageFolder directory (labels from its subfolders) or a flat "
                        "folder of images (pure distillation, no labels)")
    p.add_argument("--val-data", metavar="DIR", help="images to measure agreement (and accuracy) on each epoch")
    _output_arguments(p, "the distilled model to write (same format as REWRITTEN)")
    g = p.add_argument_group("distillation (defaults: those of convify.distill)")
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    g.add_argument("--temperature", type=float, default=4.0)
    g.add_argument("--alpha", type=float, default=0.9, help="weight of distillation against the labels")
    g.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    g.add_argument("--checkpoint-dir", metavar="DIR", help="save the training state there after every epoch")
    g.add_argument("--resume", action="store_true", help="continue from the state in --checkpoint-dir")
    g.add_argument("--input-shape", metavar="N,C,H,W",
                   help="size the images are resized to (default: REWRITTEN's example input shape)")
    g = p.add_argument_group("training speed (defaults: those of convify.distill)")
    g.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                   help="autocast the forward passes to bfloat16 or float16 (with loss scaling); default: fp32")
    g.add_argument("--channels-last", action="store_true",
                   help="train with weights and images in channels-last memory format (faster on recent GPUs)")
    g.add_argument("--workers", type=int, default=0, metavar="N",
                   help="processes that read and decode the images (default: 0, in this process)")
    g.add_argument("--compile", action="store_true", help="train a torch.compile-d student")
    p.add_argument("--trust-pickle", action="store_true", help="allow files holding pickled Python objects")
    p.add_argument("--trust-code", action="store_true",
                   help="allow a convify checkpoint whose recipe imports package.module:factory")
    _json_argument(p)


def run_distill(args: argparse.Namespace) -> int:
    """Distill REWRITTEN toward --teacher on the images in --data; write OUT."""
    import dataclasses  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from convify import io as ck  # noqa: PLC0415
    from convify.recovery.distillation import distill, image_folder  # noqa: PLC0415

    ck.check_output(args.output, force=args.force, inputs=[args.model, args.teacher])
    student_src = ck.open_model(args.model, trust_pickle=args.trust_pickle, trust_code=args.trust_code)
    teacher = _open_teacher(args, student_src)
    shape = _given_shape(args) or student_src.input_shape or tuple(_probe_shape(student_src))
    data = image_folder(args.data, shape)
    val = image_folder(args.val_data, shape) if args.val_data else None
    history = distill(teacher, student_src.model, data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      temperature=args.temperature, alpha=args.alpha, val_data=val, device=args.device,
                      progress=not args.json, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                      precision=args.precision, channels_last=args.channels_last, workers=args.workers,
                      compile=args.compile)
    student = student_src.model.cpu().eval()
    if student_src.pickled:
        ck.save_pickled(student, args.output, force=args.force, inputs=[args.model, args.teacher])
    else:
        recipe = ck.recipe_of(ck.read_file(args.model))
        payload = ck.to_checkpoint(student, recipe)
        ck.atomic_write(args.output, lambda tmp: torch.save(payload, tmp), force=args.force,
                        inputs=[args.model, args.teacher])
    if args.json:
        _print_json({"history": dataclasses.asdict(history), "written": [args.output]})
    else:
        print(history)
        _note(f"wrote {args.output}")
    return EXIT_OK


def _open_teacher(args: argparse.Namespace, student_src: "ModelSource") -> "nn.Module":
    """A convify checkpoint or pickled module as it is; a bare state_dict on
    the architecture the student's recipe names."""
    from convify import io as ck  # noqa: PLC0415

    content = ck.read_file(args.teacher, trust_pickle=args.trust_pickle, what="teacher file")
    if ck.is_checkpoint(content):
        return ck.open_model(args.teacher, trust_code=args.trust_code).model
    weights = ck.unwrap(content, args.teacher)
    if not isinstance(weights, dict):  # a whole module (read with --trust-pickle)
        return weights.eval()
    if student_src.arch is None:
        raise UsageError(f"{args.teacher} is a state_dict, and {args.model} names no architecture to load it "
                         "into; give the teacher as a convify checkpoint or a pickled module")
    return ck.open_model(arch=str(student_src.arch), arch_kwargs=student_src.arch_kwargs,
                         weights=args.teacher, trust_pickle=args.trust_pickle).model


def _probe_shape(src: "ModelSource") -> tuple[int, ...]:
    from convify.fx.inputs import probe_input  # noqa: PLC0415

    return tuple(probe_input(src.model).shape)


# --------------------------------------------------------------------------- the command table


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, one-line help, its arguments and its body."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] | None
    run: Callable[[argparse.Namespace], int]


COMMANDS: tuple[Command, ...] = (
    Command("inspect", "dry run: what would be rewritten and skipped, with shapes", _add_inspect, run_inspect),
    Command("rewrite", "rewrite a model and write a convify checkpoint (and ONNX)", _add_rewrite, run_rewrite),
    Command("export", "export a model or convify checkpoint to ONNX", _add_export, run_export),
    Command("verify", "rewrite in memory and verify it through onnxruntime; writes nothing", _add_verify,
            run_verify),
    Command("scan", "score every window of a large image in exact tiles (convify.dense_map)", _add_scan,
            run_scan),
    Command("demo", "rewrite, export and verify a small model, step by step", None, run_demo),
    Command("distill", "train a rewritten model toward the original on a folder of images", _add_distill,
            run_distill),
)


class _IntermixedParser(argparse.ArgumentParser):
    """A command's parser that takes options anywhere between its positionals: ``convify scan MODEL --tile 64
    IMAGE`` (plain argparse gives IMAGE to the optional MODEL when an option sits between them)."""

    _inner = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self._inner:  # parse_known_intermixed_args itself calls parse_known_args (Python < 3.12)
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def build_parser(commands: Sequence[Command] = COMMANDS, argv: Sequence[str] | None = None
                 ) -> argparse.ArgumentParser:
    """The argument parser: one subparser per row of ``commands``. Only the
    command named in ``argv`` gets its arguments (building them may import
    torch; ``convify --help`` must not); None: every command gets them."""
    from convify import __version__  # noqa: PLC0415

    parser = argparse.ArgumentParser(
        prog="convify",
        description="Rewrite PyTorch CNNs into all-convolutional networks: max pooling becomes strided "
                    "convolution, Linear heads become convolutions.",
        epilog="exit codes: 0 success, 1 a failed rewrite or verification, 2 bad usage or unreadable input",
    )
    parser.add_argument("--version", action="version", version=f"convify {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_IntermixedParser)
    for command in commands:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an error")
        if command.add_arguments is not None and (argv is None or command.name == _command_in(argv, commands)):
            command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def _command_in(argv: Sequence[str], commands: Sequence[Command]) -> str | None:
    names = {c.name for c in commands}
    return next((a for a in argv if a in names), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv=argv)
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.run(args)
    except BrokenPipeError:  # stdout closed early (`| head`): not an error of convify's
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("convify: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as e:  # every error ends as one line and an exit code
        if args.debug:
            traceback.print_exc()
        code, text = _classify(e)
        print(f"convify: error: {text}", file=sys.stderr)
        return code


def _classify(e: Exception) -> tuple[int, str]:
    text = " ".join((e.render(FLAGS.get) if isinstance(e, ConvifyError) else str(e)).split())
    if isinstance(e, (CheckpointError, ExampleInputError, UsageError)):
        return EXIT_USAGE, text
    if isinstance(e, ConvifyError):
        return EXIT_FAILED, text
    return EXIT_FAILED, f"unexpected {type(e).__name__}: {text[:300]} (rerun with --debug for the traceback)"


# --------------------------------------------------------------------------- steps shared by commands


def _given_shape(args: argparse.Namespace) -> tuple[int, ...] | None:
    if not args.input_shape:
        return None
    from convify.fx.inputs import parse_input_shape  # noqa: PLC0415

    try:
        return parse_input_shape(args.input_shape)
    except UsageError as e:
        raise UsageError(f"--input-shape: {e}") from e


def _rewrite_keywords(args: argparse.Namespace) -> dict[str, Any]:
    """The ``convify.convify`` keywords the rewrite flags give (``none``: leave that rewrite out)."""
    from convify.core.registry import all_keywords  # noqa: PLC0415

    return {k: None if getattr(args, k) == "none" else getattr(args, k) for k in all_keywords()}


def _open_model(args: argparse.Namespace) -> "ModelSource":
    from convify.io import open_model, parse_arch_kwargs  # noqa: PLC0415

    return open_model(args.model, arch=args.arch, arch_kwargs=parse_arch_kwargs(args.arch_kwargs),
                      weights=args.weights, trust_pickle=args.trust_pickle, trust_code=args.trust_code)


def _resolve_shape(src: "ModelSource", given: tuple[int, ...] | None) -> tuple[int, ...]:
    """The given shape (checked by one forward pass), the checkpoint's, or one
    worked out from the model."""
    import torch  # noqa: PLC0415

    from convify.fx.inputs import zeros_like_model  # noqa: PLC0415

    if given is None and src.input_shape is not None:
        return tuple(src.input_shape)
    if given is None:
        from convify.fx.inputs import probe_input  # noqa: PLC0415

        try:
            return tuple(probe_input(src.model).shape)
        except ExampleInputError as e:
            raise ExampleInputError(f"could not work out an input shape for {src.label}: {e}; "
                                    "pass --input-shape N,C,H,W") from e
    try:
        with torch.no_grad():
            src.model(zeros_like_model(src.model, given))
    except Exception as e:
        raise ExampleInputError(f"{src.label} does not run on an input of shape {_shape_text(given)}: "
                                f"{one_line(e)}; pass the --input-shape it expects") from e
    return given


def _load_and_rewrite(args: argparse.Namespace, progress: "_Progress", shape: tuple[int, ...] | None,
                      options: dict[str, Any], step: str) -> tuple["ModelSource", tuple[int, ...], "nn.Module"]:
    """The first two steps of inspect, rewrite and verify: read MODEL, then rewrite it."""
    with progress.step("loading the model"):
        src = _open_model(args)
        shape = _resolve_shape(src, shape)
    with progress.step(step):
        rewritten = _rewrite(src, options, shape, args)
    return src, shape, rewritten


def _rewrite(src: "ModelSource", options: dict[str, Any], shape: tuple[int, ...],
             args: argparse.Namespace) -> "nn.Module":
    """The passes the flags ask for, applied with the one code path that
    rebuilds checkpoints (``convify.io.apply_passes``)."""
    import torch  # noqa: PLC0415

    from convify.io import apply_passes, plan_passes  # noqa: PLC0415

    torch.manual_seed(0)  # --init kaiming gives the same weights on every run
    passes = plan_passes(options, shape, only=args.only, skip=args.skip)
    calibration = _calibration(args, passes, shape)
    try:
        rewritten = apply_passes(src.model, passes, calibration=calibration)
        if not getattr(args, "reconstruct", False):
            return rewritten
        from convify.recovery.reconstruction import reconstruct  # noqa: PLC0415

        return reconstruct(src.model, rewritten, calibration, steps=args.reconstruct_steps, lr=args.reconstruct_lr,
                           progress=False)
    except ConvifyError:
        raise
    except Exception as e:
        raise RewriteError(f"rewriting {src.label} failed: {one_line(e)}") from e


def _calibration(args: argparse.Namespace, passes: Sequence["RecipePass"], shape: tuple[int, ...]
                 ) -> list[Any] | str | None:
    """Batches of images from ``--calibration DIR``, resized to the input
    shape, when a pass or ``--reconstruct`` needs them (None otherwise; the
    word ``synthetic`` as it is)."""
    needing = [p.options for p in passes if p.options.needs_calibration()]
    reconstructing = getattr(args, "reconstruct", False)
    if not needing and not reconstructing:
        return None
    if not args.calibration:
        if not needing:
            raise UsageError("--reconstruct needs --calibration DIR, a folder of images (or --calibration "
                             "synthetic) to reconstruct on")
        field, value = needing[0].calibration_option()
        raise UsageError(f"--{field.replace('_', '-')} {value} needs --calibration DIR, a folder of images to fit "
                         "the new weights on (or --calibration synthetic)")
    if args.calibration == SYNTHETIC:
        return SYNTHETIC
    import torch  # noqa: PLC0415

    from convify.recovery.distillation import image_folder  # noqa: PLC0415

    data = image_folder(args.calibration, shape)
    count = min(len(data), max(1, args.calibration_images))
    images = [data[i][0] if isinstance(data[i], tuple) else data[i] for i in range(count)]
    return list(torch.stack(images).split(32))


def _random_input(model: "nn.Module", shape: tuple[int, ...]) -> "torch.Tensor":
    import torch  # noqa: PLC0415

    from convify.fx.inputs import zeros_like_model  # noqa: PLC0415

    like = zeros_like_model(model, shape)
    g = torch.Generator().manual_seed(0)
    return torch.randn(like.shape, generator=g, dtype=like.dtype).to(like.device)


def _report(model: "nn.Module", src: "ModelSource | None" = None) -> "Report":
    """The model's report; with ``src``, only the passes this run added (a
    convify checkpoint arrives with the passes it was made with)."""
    from convify.core.report import report  # noqa: PLC0415

    rep = report(model)
    return rep if src is None else rep.since(report(src.model))


def _summary(src: "ModelSource", rewritten: "nn.Module", options: dict[str, Any], shape: tuple[int, ...]
             ) -> dict[str, Any]:
    return {
        "model": src.label,
        "arch": str(src.arch) if src.arch is not None else None,
        "input_shape": list(shape),
        "rewrite": options,
        "parameters": {"before": _count(src.model), "after": _count(rewritten)},
        "replaced": len(_report(rewritten, src).replaced),
        "nothing_to_rewrite": not _report(rewritten, src).replaced,
    }


def _headline(summary: dict[str, Any]) -> str:
    opts = " ".join(f"{k}={v}" for k, v in summary["rewrite"].items() if v not in (None, False))
    params = summary["parameters"]
    return (f"{summary['model']}  input {_shape_text(summary['input_shape'])}  {opts}  "
            f"parameters {params['before']:,} -> {params['after']:,}")


def _count(model: "nn.Module") -> int:
    return sum(p.numel() for p in model.parameters())


def _note_if_nothing(rep: "Report", src: "ModelSource") -> None:
    if not rep.replaced:
        _note(f"nothing to rewrite in {src.label}: no max pooling or Linear head was replaced "
              f"({len(rep.skipped)} sites skipped, see the report)")


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def _note(text: str) -> None:
    print(f"convify: {text}", file=sys.stderr)


def _print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


class _Progress:
    """Step-by-step progress on stderr, shown only on a terminal."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.bar: Any = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "_Progress":
        from convify.progress import terminal_bar  # noqa: PLC0415  (the CLI imports lazily: `convify --help` is fast)

        self.bar = self._stack.enter_context(
            terminal_bar(total=self.total, bar_format="convify: {desc} [{n_fmt}/{total_fmt}] {elapsed}"))
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def set(self, desc: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(desc)

    @contextlib.contextmanager
    def step(self, desc: str) -> Iterator[None]:
        self.set(desc)
        yield
        if self.bar is not None:
            self.bar.update()
