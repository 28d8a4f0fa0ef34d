"""What the commands write: output names checked against the format before any
work, and the notes that say what a written file holds or needs.

Each output flag writes one format. A name whose suffix promises another
format (``rewrite -o out.onnx``, ``export -o out.pt``) is refused before
anything runs, naming the flag and what to use instead; a name with any other
suffix, or none, is written as it is.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from convify.cli.console import note
from convify.errors import UsageError

if TYPE_CHECKING:
    from convify.io import ModelSource


@dataclass(frozen=True)
class FileFormat:
    """A format a command writes or a suffix promises, with the suffixes that name it (the first one suggested)."""

    name: str
    suffixes: tuple[str, ...]


CHECKPOINT = FileFormat("a PyTorch checkpoint", (".pt", ".pth", ".ckpt", ".bin"))
ONNX = FileFormat("an ONNX model", (".onnx",))
NUMPY = FileFormat("a NumPy array", (".npy",))
PNG = FileFormat("a PNG image", (".png",))

#: Formats no command writes, known so that their suffixes are refused too.
_OTHERS = (FileFormat("safetensors weights", (".safetensors",)), FileFormat("a NumPy archive", (".npz",)),
           FileFormat("a JSON file", (".json",)), FileFormat("a JPEG image", (".jpg", ".jpeg")),
           FileFormat("a TIFF image", (".tif", ".tiff")), FileFormat("a TensorFlow Lite model", (".tflite",)))
_KNOWN = (CHECKPOINT, ONNX, NUMPY, PNG, *_OTHERS)


def check_suffix(path: str | None, flag: str, writes: FileFormat, instead: str) -> None:
    """Refuse ``path`` when its suffix names a format other than ``writes``
    (``instead``: what to use for that format); any other name passes.

    >>> check_suffix("out.onnx", "-o", CHECKPOINT, "--onnx out.onnx exports the rewritten model")
    Traceback (most recent call last):
    UsageError: -o out.onnx: -o writes a PyTorch checkpoint, not an ONNX model; ...
    """
    if path is None:
        return
    suffix = Path(path).suffix.lower()
    if suffix in writes.suffixes:
        return
    promised = next((f for f in _KNOWN if suffix in f.suffixes), None)
    if promised is None:
        return
    renamed = Path(path).with_suffix(writes.suffixes[0])
    raise UsageError(f"{flag} {path}: {flag} writes {writes.name}, not {promised.name}; name it {renamed} "
                     f"({instead})")


def note_random_weights(src: "ModelSource", args: argparse.Namespace, written: str) -> None:
    """Say so when ``written`` holds the weights an ``--arch`` builder made, because no ``--weights`` were given."""
    if args.arch is None or args.weights is not None or args.model is not None or src.arch is None:
        return
    kind, kwargs = src.arch.kind, src.arch_kwargs
    if src.arch.runs_foreign_code:
        note(f"{written} holds the weights {src.arch} builds: no --weights was given (random, unless the "
             "factory loads trained ones)")
        return
    if (kind == "torchvision" and kwargs.get("weights")) or (kind == "timm" and kwargs.get("pretrained")):
        return  # the builder downloaded pretrained weights, as asked
    note(f"{written} holds random weights: --arch {src.arch} was built without --weights (give the trained "
         "ones with --weights FILE)")


def note_trust_code(src: "ModelSource", written: str) -> None:
    """Say so when the checkpoint ``written`` names an import path: reading it will need ``--trust-code``."""
    if src.arch is not None and src.arch.runs_foreign_code:
        note(f"{written} rebuilds its model by calling {src.arch}: every use of it needs --trust-code "
             "(convify.load(..., trust_code=True)) and that module importable")
