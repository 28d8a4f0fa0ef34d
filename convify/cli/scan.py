"""``convify scan``: score every window of a large image in exact tiles (``convify.dense_map``)."""
from __future__ import annotations

import argparse
import os
from typing import Any

from convify.cli import onnx_files
from convify.cli.arguments import given_shape, json_argument, model_arguments, output_arguments
from convify.cli.command import EXIT_OK, Command
from convify.cli.console import Progress, note, print_json, shape_text
from convify.cli.models import load_model, random_input, resolve_shape
from convify.cli.outputs import NUMPY, PNG, check_suffix, note_random_weights
from convify.errors import DataError, UsageError
from convify.wording import counted

_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def add_arguments(p: argparse.ArgumentParser) -> None:
    model_arguments(p)
    p.add_argument("image", metavar="IMAGE", help="a PNG, JPEG or TIFF image of any size")
    output_arguments(p, "the score map to write: a .npy file, float32, shape (1, K, H', W') (a name ending in "
                        "another format's suffix, such as .png, is refused: --png draws the heat map)")
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
                   help="with --onnx or a dense ONNX MODEL: onnxruntime provider (default: cpu)")
    json_argument(p)


def run(args: argparse.Namespace) -> int:
    """Score every window of IMAGE with MODEL made dense, in exact tiles; write OUT.npy (and a PNG)."""
    from convify import io as ck  # noqa: PLC0415
    from convify.dense import is_dense, load_image, scan  # noqa: PLC0415
    from convify.dense.images import conversion_of  # noqa: PLC0415

    check_suffix(args.output, "-o", NUMPY, f"--png {args.output} draws the heat map")
    check_suffix(args.png, "--png", PNG, "-o names the score map")
    inputs = [args.model, args.weights, args.image]
    ck.check_output(args.output, force=args.force, inputs=inputs)
    if args.png:
        ck.check_output(args.png, force=args.force, inputs=inputs + [args.output])
    if not os.path.isfile(args.image):
        raise UsageError(f"{args.image}: no such image file")
    if onnx_files.names_onnx(args):
        return _run_onnx(args, inputs)
    shape = given_shape(args)
    with Progress(2) as progress:
        with progress.step("loading the model"):
            src = load_model(args)
            shape = resolve_shape(src, shape)
            channels = _image_channels(src.label, shape)
            try:  # read before any conversion: a bad image fails fast
                image = load_image(args.image, channels)
            except DataError as e:
                raise UsageError(str(e)) from e
            conversion = conversion_of(args.image, channels)
        model = src.model.eval()
        converted = not is_dense(model)
        with progress.step("converting the head (dense=True)"):
            if converted:
                model = _made_dense(src, shape)
    result = scan(model, image, tile=args.tile, batch_size=args.batch_size, device=args.device,
                  progress=not args.json, onnx=True if args.onnx else None, provider=args.provider,
                  normalize=_IMAGENET if args.normalize == "imagenet" else None)
    notes = [f"{conversion} ({src.label} takes {counted(channels, 'channel')})"] if conversion is not None else []
    if converted:
        notes.append(f"{src.label} is not dense: converted its head dense, as rewrite --dense does (weights kept)")
    _write_outputs(args, src.label, result, inputs, notes)
    note_random_weights(src, args, args.output)
    return EXIT_OK


def _run_onnx(args: argparse.Namespace, inputs: list[Any]) -> int:
    """A dense ONNX MODEL: the tiles run in onnxruntime on --provider; a file that is not dense is refused."""
    from convify.dense import scan  # noqa: PLC0415
    from convify.dense.images import conversion_of, load_image  # noqa: PLC0415
    from convify.dense.onnx_scan import image_channels, read_dense  # noqa: PLC0415

    onnx_files.refuse_torch_flags(args)
    if args.device is not None:
        raise UsageError(f"{args.model} is an ONNX model: --device applies to PyTorch models only; it runs in "
                         "onnxruntime on --provider")
    with Progress(1) as progress:
        with progress.step("reading the model"):
            model = read_dense(args.model)
            channels = image_channels(model)
            try:
                image = load_image(args.image, channels)
            except DataError as e:
                raise UsageError(str(e)) from e
            conversion = conversion_of(args.image, channels)
    result = scan(model, image, tile=args.tile, batch_size=args.batch_size, progress=not args.json,
                  provider=args.provider, normalize=_IMAGENET if args.normalize == "imagenet" else None)
    notes = [f"{conversion} ({args.model} takes {counted(channels, 'channel')})"] if conversion is not None else []
    _write_outputs(args, str(args.model), result, inputs, notes)
    return EXIT_OK


def _write_outputs(args: argparse.Namespace, label: str, result: Any, inputs: list[Any], notes: list[str]) -> None:
    """Write the map (and the heat map), print the summary, then the notes: after success, so that an error
    stays one line."""
    import numpy as np  # noqa: PLC0415

    from convify import io as ck  # noqa: PLC0415
    from convify.dense import heatmap  # noqa: PLC0415

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
        raise UsageError(f"--class {args.class_index}: the map has {counted(scores.shape[1], 'class', 'classes')} "
                         f"(0 .. {scores.shape[1] - 1})")
    ck.atomic_write(args.output, write, force=args.force, inputs=inputs)
    summary = _scan_summary(label, result)
    if args.json:
        print_json({**summary, "written": written})
    else:
        print(_scan_headline(summary))
    for text in notes:
        note(text)
    for path in written:
        note(f"wrote {path}")


def _image_channels(label: str, shape: tuple[int, ...]) -> int:
    """The channels to read the image with: the model's 1 (grayscale) or 3 (RGB)."""
    if len(shape) != 4:
        return 3  # the model's own check names the rank it needs
    if shape[1] not in (1, 3):
        raise UsageError(f"{label} takes {shape[1]} input channels; scan reads an image as 1 (grayscale) or "
                         "3 (RGB) channels")
    return shape[1]


def _made_dense(src: Any, shape: tuple[int, ...]) -> Any:
    """MODEL with its head dense: a Linear head converted with
    ``replace_linear_head(dense=True)``; a head a recipe already converted
    without ``dense`` rebuilt dense from the recipe, with the same weights."""
    from convify import replace_linear_head  # noqa: PLC0415
    from convify.io import rebuild_dense  # noqa: PLC0415

    rebuilt = rebuild_dense(src.model, src.arch, src.arch_kwargs) if src.arch is not None else None
    if rebuilt is not None:
        return rebuilt
    return replace_linear_head(src.model.eval(), random_input(src.model, shape), dense=True)


def _scan_summary(label: str, result: Any) -> dict[str, Any]:
    plan = result.plan
    return {"model": label, "image": list(result.image.shape), "map": list(result.scores.shape),
            "geometry": plan.geometry.to_dict(), "tile": list(plan.tile), "tiles": len(plan.tiles),
            "batch_size": result.batch_size, "halo_overhead": round(plan.overhead, 4), "runner": result.runner}


def _scan_headline(s: dict[str, Any]) -> str:
    g = s["geometry"]
    return (f"{s['model']}  image {shape_text(s['image'])} -> map {shape_text(s['map'])}  stride "
            f"{shape_text(g['stride'])}, receptive field {shape_text(g['size'])}, offset "
            f"{','.join(map(str, g['offset']))}  {counted(s['tiles'], 'tile')} of {shape_text(s['tile'])} "
            f"(halo overhead "
            f"{s['halo_overhead']:.2f}x) on {s['runner']}")


SCAN = Command("scan", "score every window of a large image in exact tiles (convify.dense_map)", add_arguments, run)
