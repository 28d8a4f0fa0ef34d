"""Library errors as the command line reports them: one line and an exit code.

Library errors name parameters in the library's terms; :data:`FLAGS` says
how the command line spells them.
"""
from __future__ import annotations

from convify.cli.command import EXIT_FAILED, EXIT_USAGE
from convify.errors import CheckpointError, ConvifyError, ExampleInputError, UsageError

#: How the command line spells the parameters library errors name (see convify.errors.PARAMETERS).
FLAGS = {
    "force": "--force", "trust_pickle": "--trust-pickle", "trust_code": "--trust-code", "path": "MODEL",
    "weights": "--weights", "arch": "--arch", "arch_kwargs": "--arch-kwargs", "input_shape": "--input-shape",
    "calibration": "--calibration DIR", "precision": "--precision", "device": "--device", "dense": "--dense",
    "fixed_spatial": "--no-dynamic-spatial", "input_names": "--input-names", "output_names": "--output-names",
    "no_compile": "leave out --compile", "make_dense": "convify rewrite --dense",
    "make_dense_onnx": "convify rewrite MODEL.onnx --dense -o OUT.onnx",
}


def classify(e: Exception) -> tuple[int, str]:
    """The exit code for ``e`` and its one-line text, in the command line's flags."""
    text = " ".join((e.render(FLAGS.get) if isinstance(e, ConvifyError) else str(e)).split())
    if isinstance(e, (CheckpointError, ExampleInputError, UsageError)):
        return EXIT_USAGE, text
    if isinstance(e, ConvifyError):
        return EXIT_FAILED, text
    return EXIT_FAILED, f"unexpected {type(e).__name__}: {text[:300]} (rerun with --debug for the traceback)"
