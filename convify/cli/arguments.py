"""The argument groups several commands share, and reading them back.

The rewrite flags (``--pool``, ``--init``, ``--head``, ``--dense``...) are made
from the options each registered rewrite declares, so a new rewrite brings its
flags with it.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from convify.errors import UsageError


def model_arguments(p: argparse.ArgumentParser) -> None:
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
                   help="example input shape, of the rank the model's first convolution takes (N,C,H,W for a "
                        "Conv2d; default: the checkpoint's, else worked out from the model)")


def rewrite_arguments(p: argparse.ArgumentParser) -> None:
    """One group of flags per registered rewrite, made from its options."""
    from convify.core.options import choices_of, help_of  # noqa: PLC0415
    from convify.core.registry import in_order  # noqa: PLC0415  (the specs import torch)

    for spec in in_order():
        g = p.add_argument_group(f"{spec.name} rewrite: {spec.summary} (defaults: those of convify.convify)")
        for f in dataclasses.fields(spec.Options):
            key = spec.keyword_of(f.name)
            flag = option_flag(spec, f)
            helptext, choices = help_of(f), choices_of(f)
            if f.default is True:
                g.add_argument(flag, dest=key, action="store_false", help=helptext)
            elif isinstance(f.default, bool):
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


def output_arguments(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("-o", "--output", required=True, metavar="OUT", help=what)
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def verify_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("verification (export to ONNX, run in onnxruntime, compare)")
    g.add_argument("--provider", choices=["cpu", "cuda"], default="cpu", help="onnxruntime provider (default: cpu)")
    g.add_argument("--min-agreement", type=float, metavar="FRACTION",
                   help="pass a rewrite that is not exact only if top-1 agreement reaches FRACTION")
    g.add_argument("--atol", type=float, help="absolute tolerance (default: convify.verify's)")
    g.add_argument("--rtol", type=float, help="relative tolerance (default: convify.verify's)")
    g.add_argument("--inputs", metavar="DIR",
                   help="compare on these images: a folder (flat, or class subfolders) read as --calibration reads "
                        "it (resized to the input shape; normalized with ImageNet's mean and std for 3 channels, "
                        "0.5 and 0.5 otherwise) (default: seeded random inputs)")
    g.add_argument("--inputs-count", type=int, metavar="N",
                   help="compare on at most N images of --inputs (default: 1000), or without --inputs on N seeded "
                        "random inputs (default: 8)")


def onnx_arguments(p: argparse.ArgumentParser, spatial: bool = True) -> None:
    """The ONNX options; ``spatial``: also those of a file the command keeps
    (dynamic height and width, input and output names)."""
    g = p.add_argument_group("ONNX export")
    if spatial:
        g.add_argument("--dynamic-spatial", action=argparse.BooleanOptionalAction, default=None,
                       help="make height and width dynamic (default: yes for a --dense model, no otherwise)")
        g.add_argument("--input-names", metavar="NAME[,NAME...]",
                       help="names of the file's inputs, one per input (default: the model's own for a Hugging "
                            "Face model, pixel_values; else input)")
        g.add_argument("--output-names", metavar="NAME[,NAME...]",
                       help="names of the file's outputs, one per output tensor (default: the model's own for a "
                            "Hugging Face model, logits; else output)")
    g.add_argument("--exporter", choices=["dynamo", "legacy"], default="dynamo",
                   help="torch's current exporter (default; falls back to legacy on failure) or the legacy one")
    g.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")


def onnx_names(args: argparse.Namespace) -> dict[str, Any]:
    """``--input-names``/``--output-names`` as ``export_onnx`` keywords (None: the default names)."""
    def split(text: str | None, flag: str) -> list[str] | None:
        if text is None:
            return None
        names = [n.strip() for n in text.split(",")]
        if not all(names):
            raise UsageError(f"{flag}: give names separated by commas, got {text!r}")
        return names

    return {"input_names": split(args.input_names, "--input-names"),
            "output_names": split(args.output_names, "--output-names")}


def json_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")


def given_shape(args: argparse.Namespace) -> tuple[int, ...] | None:
    """``--input-shape`` as a tuple (None: not given)."""
    if not args.input_shape:
        return None
    from convify.fx.inputs import parse_input_shape  # noqa: PLC0415

    try:
        return parse_input_shape(args.input_shape)
    except UsageError as e:
        raise UsageError(f"--input-shape: {e}") from e


def option_flag(spec: Any, f: dataclasses.Field) -> str:
    """The command-line flag of one rewrite option: ``--<keyword>``, or for
    a bool that defaults to True, the flag that turns it off (``--ungrouped``)."""
    from convify.core.options import off_flag_of  # noqa: PLC0415

    if f.default is True:
        off = off_flag_of(f)
        if off is None:
            raise TypeError(f"option {spec.name}.{f.name} defaults to True but declares no off_flag")
        return "--" + off.replace("_", "-")
    return "--" + spec.keyword_of(f.name).replace("_", "-")


def rewrite_flags_given(args: argparse.Namespace) -> list[str]:
    """The rewrite, site and calibration flags given a value other than their default, as written."""
    from convify.core.registry import in_order  # noqa: PLC0415

    given = []
    for spec in in_order():
        for f in dataclasses.fields(spec.Options):
            key = spec.keyword_of(f.name)
            if getattr(args, key) != ("none" if f.default is None else f.default):
                given.append(option_flag(spec, f))
    return given + [f"--{k}" for k in ("only", "skip", "calibration", "reconstruct") if getattr(args, k, None)]


def rewrite_keywords(args: argparse.Namespace) -> dict[str, Any]:
    """The ``convify.convify`` keywords the rewrite flags give (``none``: leave that rewrite out)."""
    from convify.core.registry import all_keywords  # noqa: PLC0415

    return {k: None if getattr(args, k) == "none" else getattr(args, k) for k in all_keywords()}
