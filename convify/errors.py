"""The errors convify raises. Each message names the node, module or file,
says what is wrong and what to do about it.

Messages speak the library's language. Where a message tells the caller to
pass a parameter, it names it as a placeholder (``{force}``) that reads in the
library's spelling (``force=True``, from :data:`PARAMETERS`); the command line
renders the same error with its own flags (``--force``) through
:meth:`ConvifyError.render`.

>>> e = CheckpointError("out.pt exists: pass {force} to replace it")
>>> str(e)
'out.pt exists: pass force=True to replace it'
>>> e.render({"force": "--force"}.get)
'out.pt exists: pass --force to replace it'
"""
from __future__ import annotations

from typing import Callable

#: Longest text :func:`one_line` keeps of a foreign exception's message.
ONE_LINE_LIMIT = 300

#: Parameters that messages name as ``{placeholder}``, in the library's spelling.
PARAMETERS: dict[str, str] = {
    "force": "force=True",
    "trust_pickle": "trust_pickle=True",
    "trust_code": "trust_code=True",
    "path": "path",
    "weights": "weights=",
    "arch": "arch=",
    "arch_kwargs": "arch_kwargs=",
    "input_shape": "example_input=",
    "calibration": "calibration=",
    "precision": "precision=",
    "device": "device=",
    "dense": "dense=True",
    "fixed_spatial": "dynamic_spatial=False",
    "input_names": "input_names=",
    "output_names": "output_names=",
    # a whole phrase: the library turns an option off, the command line leaves a flag out
    "no_compile": "pass compile=False",
    "make_dense": "replace_linear_head(..., dense=True)",
    "make_dense_onnx": "convify.replace_linear_head(model, dense=True) (an ONNX model back)",
}


class ConvifyError(Exception):
    """Base class of every error convify raises on purpose."""

    def __init__(self, message: str = "") -> None:
        self.template = message
        super().__init__(self.render())

    def render(self, spell: Callable[[str], str | None] | None = None) -> str:
        """The message with each ``{parameter}`` written by ``spell(name)``
        (a flag, for the command line) or else in the library's spelling."""
        text = self.template
        for name, library in PARAMETERS.items():
            token = "{" + name + "}"
            if token in text:
                text = text.replace(token, (spell(name) if spell else None) or library)
        return text


class UsageError(ConvifyError):
    """Options or arguments that are invalid, contradict each other or name nothing."""


class OptionError(UsageError, ValueError):
    """A rewrite option with a value it does not take (a ``ValueError`` too,
    for callers that catch that)."""


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


class CompileError(ConvifyError):
    """``torch.compile`` is unavailable or could not compile a model that runs eagerly."""


class CheckpointError(ConvifyError):
    """A model or checkpoint file could not be read, trusted or written."""


class ModelFileError(CheckpointError):
    """An ONNX model file (or proto) could not be read, checked or written:
    not ONNX, truncated, or rejected by the ONNX checker. A
    :class:`CheckpointError`, so the command line reports it as bad input."""


class DataError(ConvifyError):
    """A data file or folder (images, IDX files) could not be read."""


def one_line(e: BaseException, limit: int = ONE_LINE_LIMIT) -> str:
    """``TypeName: first line of the message``, cut at ``limit`` characters:
    how a foreign exception is quoted inside a convify message."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:limit]
