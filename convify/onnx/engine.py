"""Applies the core's rewrites to an ONNX model and records what they did in it.

:func:`rewrite_onnx` reads the model (or clones an ``ir.Model``), applies
each rewrite's ONNX implementation (:mod:`convify.onnx.rewrites`) in the
registry's order, one :class:`~convify.core.report.Pass` each, and stores
the whole :class:`~convify.core.report.Report` as JSON in the model's
``metadata_props`` under :data:`REPORT_KEY`, after the report of an earlier
rewrite of the same model if it has one. :func:`report_of` reads it back,
from a model, a proto or a file.

>>> model = rewrite_onnx("resnet18.onnx", MaxPoolOptions(mode="exact"))
>>> write_model(model, "resnet18_exact.onnx")
>>> print(report_of("resnet18_exact.onnx"))
"""
from __future__ import annotations

import fnmatch
import json
import os
from typing import Sequence

import onnx
import onnx_ir as ir

from convify.core import registry
from convify.core.options import RewriteOptions
from convify.core.report import Pass, Replaced, Report, Skipped
from convify.errors import ConvifyError, ModelFileError, RewriteError, UsageError, one_line
from convify.onnx.building import GraphEditor
from convify.onnx.files import read_model, read_skeleton
from convify.onnx.rewrites import OnnxRewrite, Site, implementation
from convify.onnx.values import infer_shapes

#: The ``metadata_props`` key under which a rewritten model carries its report (JSON of ``Report.to_dict``).
REPORT_KEY = "convify.report"


def rewrite_onnx(source: str | os.PathLike | onnx.ModelProto | ir.Model,
                 options: RewriteOptions | Sequence[RewriteOptions], *,
                 only: str | Sequence[str] | None = None, skip: str | Sequence[str] | None = None) -> ir.Model:
    """The model with each rewrite whose options are given applied, in the
    registry's order; ``source`` is not changed (an ``ir.Model`` is cloned;
    the clone shares its weights, which no rewrite changes).

    ``only`` / ``skip``: glob patterns over site names (a node's name, or
    ``MaxPool(<output>)`` for an unnamed one); a site they leave out is a
    skipped row. Every node not rewritten stays as it was: its name,
    attributes and place; so do opsets, metadata and the graph's inputs and
    outputs. The report goes into ``metadata_props[REPORT_KEY]``.
    """
    given = [options] if isinstance(options, RewriteOptions) else list(options)
    if not given:
        raise UsageError("rewrite_onnx needs the options of at least one rewrite (e.g. MaxPoolOptions(mode='exact'))")
    for opts in given:
        if not isinstance(opts, RewriteOptions):
            raise UsageError(f"rewrite_onnx takes rewrite options (MaxPoolOptions, ...), not {type(opts).__name__}")
    order = {spec.name: i for i, spec in enumerate(registry.in_order())}
    rewrites = [implementation(o.rewrite)(o) for o in sorted(given, key=lambda o: order.get(o.rewrite, len(order)))]
    model = source.clone(deep_copy=True) if isinstance(source, ir.Model) else read_model(source)
    patterns = _Patterns(_as_patterns(only), _as_patterns(skip))
    report = _stored_report(model.metadata_props, "the model")
    for rewrite in rewrites:
        report = report.with_pass(_apply(model, rewrite, patterns))
    model.metadata_props[REPORT_KEY] = json.dumps(report.to_dict())
    return model


class _Patterns:
    """``only`` and ``skip`` as globs over site names, and which of them matched a site."""

    def __init__(self, only: tuple[str, ...] | None, skip: tuple[str, ...] | None) -> None:
        self.only, self.skip = only, skip
        self.matched: set[str] = set()

    def reason(self, name: str) -> str | None:
        if self.only is not None:
            pattern = _first_match(name, self.only)
            if pattern is None:
                return f"not matched by only={list(self.only)}"
            self.matched.add(pattern)
        pattern = _first_match(name, self.skip)
        if pattern is not None:
            self.matched.add(pattern)
            return f"matched skip pattern {pattern!r}"
        return None

    def unmatched(self) -> list[str]:
        return [p for p in (*(self.only or ()), *(self.skip or ())) if p not in self.matched]


def _first_match(name: str, patterns: tuple[str, ...] | None) -> str | None:
    return next((p for p in patterns or () if fnmatch.fnmatchcase(name, p)), None)


def _as_patterns(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return (value,) if isinstance(value, str) else tuple(value)


def _apply(model: ir.Model, rewrite: OnnxRewrite, patterns: _Patterns) -> Pass:
    """One rewrite over the whole model: its pass."""
    shapes = infer_shapes(model)  # again for each rewrite: an earlier one added values
    planned: list[Site] = []
    skipped: list[Skipped] = []
    for site in rewrite.find_sites(model, shapes):
        reason = site.skip_reason or patterns.reason(site.name)
        if reason:
            skipped.append(Skipped(rewrite.name, site.name, site.op, reason, site.in_shape, site.out_shape,
                                   site.skip_cause if site.skip_reason else None))
        else:
            planned.append(site)
    edit = GraphEditor(model)
    replaced = [_apply_site(rewrite, edit, site) for site in planned]
    notes = [] if replaced or skipped else [rewrite.nothing_found()]
    notes += rewrite.finish(replaced)
    notes += [f"pattern {p!r} matched no {rewrite.name} site" for p in patterns.unmatched()]
    return Pass(rewrite=rewrite.name, options=rewrite.options.to_dict(), only=patterns.only, skip=patterns.skip,
                input_shape=_input_shape(model), replaced=tuple(replaced), skipped=tuple(skipped),
                notes=tuple(dict.fromkeys(notes)))


def _apply_site(rewrite: OnnxRewrite, edit: GraphEditor, site: Site) -> Replaced:
    try:
        return rewrite.apply(edit, site)
    except ConvifyError:
        raise
    except Exception as e:
        raise RewriteError(f"{rewrite.name}: could not rewrite ONNX node {site.name} ({site.op}): {one_line(e)}; "
                           f"leave it out with skip={site.name!r} and report this model to convify") from e


def _input_shape(model: ir.Model) -> tuple[int, ...] | None:
    """The static shape of the model's one input (what a pass's ``input_shape`` says), else None."""
    inputs = [v for v in model.graph.inputs if not v.is_initializer()]
    if len(inputs) != 1 or inputs[0].shape is None or not all(isinstance(d, int) for d in inputs[0].shape):
        return None
    return tuple(inputs[0].shape)


# --------------------------------------------------------------------------- the report in the model


def report_of(source: str | os.PathLike | onnx.ModelProto | ir.Model) -> Report:
    """The report a rewritten model carries (empty when it carries none): of
    an ``ir.Model``, an ``onnx.ModelProto`` or a file (read without its
    weights)."""
    if isinstance(source, ir.Model):
        return _stored_report(source.metadata_props, "the model")
    if isinstance(source, onnx.ModelProto):
        return _stored_report({p.key: p.value for p in source.metadata_props}, "the model")
    if not isinstance(source, (str, os.PathLike)):
        raise ModelFileError(f"expected a path, an onnx.ModelProto or an onnx_ir.Model, got {type(source).__name__}")
    try:
        proto = read_skeleton(source)
    except FileNotFoundError as e:
        raise ModelFileError(f"{source}: no such file") from e
    except Exception as e:
        raise ModelFileError(f"{source} is not an ONNX model, or is truncated ({one_line(e)})") from e
    return _stored_report({p.key: p.value for p in proto.metadata_props}, str(source))


def _stored_report(props: dict[str, str], what: str) -> Report:
    text = props.get(REPORT_KEY)
    if not text:
        return Report()
    try:
        return Report.from_dict(json.loads(text))
    except (ValueError, TypeError, KeyError) as e:
        raise ModelFileError(f"{what}: its metadata {REPORT_KEY!r} is no convify report ({one_line(e)}); "
                             "remove that entry") from e
