"""The errors convify raises. Each message names the node, module or file,
says what is wrong and what to do about it."""
from __future__ import annotations


class ConvifyError(Exception):
    """Base class of every error convify raises on purpose."""


class ExampleInputError(ConvifyError):
    """No usable example input: none was given and none could be worked out,
    or the one given does not run through the model."""


class TraceError(ConvifyError):
    """torch.fx could not trace a model (or any of its submodules)."""


class RewriteError(ConvifyError):
    """A rewrite could not be applied to a site it had accepted."""


class ExportError(ConvifyError):
    """Exporting a model to ONNX failed."""


class VerificationError(ConvifyError):
    """A verification could not be run (not: a verification that failed,
    which is a `Verification` with `passed == False`)."""


class CheckpointError(ConvifyError):
    """A model or checkpoint file could not be read, trusted or written."""
