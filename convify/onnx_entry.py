"""The entry points' ONNX side: ``convify.replace_maxpool``, ``replace_linear_head``,
``convify``, ``report`` and ``verify`` take an ONNX model where they take a
PyTorch one, and this module is where they turn to the ONNX frontend
(:mod:`convify.onnx`): the same options, applied to the graph, an
``onnx.ModelProto`` back.

What is an ONNX model here: :func:`convify.onnx.detect.is_onnx`. Nothing
here imports onnx until one is met, so PyTorch users pay nothing for it.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from convify.core.options import RewriteOptions
from convify.errors import UsageError
from convify.onnx.detect import is_onnx


def refuse_torch_only(call: str, given: Mapping[str, Any]) -> None:
    """A ``UsageError`` naming the PyTorch-only arguments given for an ONNX model, if any."""
    named = [name for name, value in given.items() if value is not None and value is not False]
    if named:
        raise UsageError(f"{call}: {', '.join(named)} {'applies' if len(named) == 1 else 'apply'} to PyTorch models "
                         "only; an ONNX model is rewritten at the shapes its graph declares, without data: leave "
                         f"{'it' if len(named) == 1 else 'them'} out")


def rewrite(model: Any, options: RewriteOptions | Sequence[RewriteOptions], only: Any, skip: Any) -> Any:
    """The ONNX frontend's rewrite of ``model``, as an ``onnx.ModelProto`` that carries its report.

    The proto holds every weight, also those the source kept in an external data file: a proto's
    external references are relative to a file it no longer comes from, so ``onnx.save(result,
    anywhere)`` would write a model that cannot find them. A model over the 2 GB a proto holds is
    refused with the way to rewrite it file to file."""
    from convify.onnx import rewrite_onnx, to_proto  # noqa: PLC0415
    from convify.onnx.files import embed_external_data  # noqa: PLC0415

    rewritten = rewrite_onnx(model, options, only=only, skip=skip)
    return to_proto(embed_external_data(rewritten, model))


def report(model: Any):
    """The report an ONNX model carries in its ``metadata_props`` (empty if none)."""
    from convify.onnx import report_of  # noqa: PLC0415

    return report_of(model)


__all__ = ["is_onnx", "refuse_torch_only", "report", "rewrite"]
