"""What a rewrite implements in the ONNX frontend.

A rewrite is declared once in the core (a :class:`~convify.core.spec.RewriteSpec`);
this frontend implements it as an :class:`OnnxRewrite` subclass in its own
file under ``convify/onnx/rewrites/``, marked with
:func:`~convify.onnx.rewrites.implements`. The subclass finds its
:class:`Site` s in a model (each with a skip reason when it must be left
alone) and applies itself to one site at a time through a
:class:`~convify.onnx.building.GraphEditor`, returning a
:class:`~convify.core.report.Replaced` row whose ``detail`` is the core's
record of the site. The engine (:mod:`convify.onnx.engine`) does the rest:
reading, shape inference, ``only``/``skip``, the report in the model.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Sequence, TypeVar

import onnx_ir as ir

from convify.core.options import RewriteOptions
from convify.core.report import Replaced, Shape, SkipCause
from convify.core.spec import RewriteSpec
from convify.errors import UsageError
from convify.onnx.building import GraphEditor
from convify.onnx.values import ShapeTable

#: A rewrite's facts of one site (:class:`~convify.onnx.rewrites.maxpool.window.PoolSite` for a max pooling).
P = TypeVar("P")


@dataclass
class Site(Generic[P]):
    """One node a rewrite looked at: ``name`` is what ``only``/``skip``
    match (the node's name, or its op and first output where it has none),
    ``op`` how the report shows it; ``params`` what the rewrite read there
    (None for a site it skips before reading it)."""

    name: str
    node: ir.Node
    op: str
    skip_reason: str | None = None
    params: P | None = None
    in_shape: Shape | None = None
    out_shape: Shape | None = None
    skip_cause: SkipCause | None = None


class OnnxRewrite(abc.ABC, Generic[P]):
    """Base of the ONNX implementations of the core's rewrites; see the module docstring."""

    spec: ClassVar[RewriteSpec]

    def __init__(self, options: RewriteOptions | None = None, **values: Any) -> None:
        self.options = self.spec.checked_options(options, values)
        calibration = self.options.calibration_option()
        if calibration is not None:
            name, value = calibration
            raise UsageError(f"{self.name}: {name}={value!r} fits weights on calibration data, which the ONNX "
                             f"frontend does not take; choose another {name}")

    @property
    def name(self) -> str:
        return self.spec.name

    @abc.abstractmethod
    def find_sites(self, model: ir.Model, shapes: ShapeTable) -> list[Site[P]]:
        """Every site in ``model`` (its main graph's in order, then any in
        subgraphs or functions, which are skipped with the reason)."""

    @abc.abstractmethod
    def apply(self, edit: GraphEditor, site: Site[P]) -> Replaced:
        """Rewrite one site (not skipped) through ``edit``."""

    def nothing_found(self) -> str:
        """The pass note when a model has no site at all."""
        return f"no {self.name} site found in the graph: nothing to rewrite"

    def finish(self, rows: Sequence[Replaced]) -> list[str]:
        """Notes for the pass once every site is applied (``rows``: what they became)."""
        return []
