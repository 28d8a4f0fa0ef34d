"""Typed records of what a rewrite did: one row per site it looked at.

Every site a rewrite finds ends as a :class:`Replaced` or a :class:`Skipped`
row; modules that torch.fx could not trace are :class:`Untraced` rows. A
:class:`Report` is a sequence of :class:`Pass` es, one per rewrite applied, so
that ``convify.convify`` (pooling then head) reports both.
"""
from __future__ import annotations

import dataclasses
import enum
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Iterable, Sequence, TypeVar

from convify.wording import counted

if TYPE_CHECKING:  # `import convify` (and `convify --help`) must not pay for importing torch
    import torch.nn as nn

REPORT_ATTR = "_convify_report"

Shape = tuple[int, ...]

#: A rewrite's typed record of one site (``PoolRecord``, ``HeadRecord``, ...).
D = TypeVar("D")


def qualified(prefix: str, name: str) -> str:
    """``name`` inside the submodule at ``prefix`` (``"features" + "pool"``)."""
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


@dataclass(frozen=True)
class Fit:
    """What fitting a site's new weights on calibration data achieved: the
    relative error ``||X w - Y|| / ||Y||`` toward ``toward`` with the weights
    it started from (``start``, e.g. the average init) and after the fit."""

    error_before: float
    error_after: float
    samples: int
    start: str
    toward: str
    #: Top-1 agreement with the original's classes on the calibration data
    #: after and before the fit, for a fit toward logits (else None).
    agreement: float | None = None
    agreement_before: float | None = None

    def describe(self) -> str:
        text = (f"init=fit, reconstruction error {self.error_after:.3g} ({self.start} {self.error_before:.3g}) "
                f"on {counted(self.samples, 'calibration sample')}, toward {self.toward}")
        if self.agreement is not None:
            before = f" ({self.start} {self.agreement_before:.1%})" if self.agreement_before is not None else ""
            text += f"; top-1 agreement with the original {self.agreement:.1%}{before}"
        return text


@dataclass(frozen=True)
class Reconstruction:
    """What :func:`convify.reconstruct` did to one site's block (its new
    convolution and the layers after it up to ``toward``): the relative error
    ``||y - t|| / ||t||`` at the block's end over the calibration data before,
    after re-estimating its BatchNorms' statistics, and after ``steps`` Adam
    steps on ``trained`` (module names). ``reverted`` names what was undone
    because it made the error larger ("" when nothing was)."""

    error_before: float
    error_reestimated: float
    error_after: float
    samples: int
    steps: int
    lr: float
    toward: str
    trained: tuple[str, ...] = ()
    batchnorms: tuple[str, ...] = ()
    reverted: str = ""

    def describe(self) -> str:
        text = (f"reconstructed: error {self.error_before:.3g} -> {self.error_after:.3g} toward {self.toward} "
                f"({counted(len(self.batchnorms), 'BatchNorm')} re-estimated: {self.error_reestimated:.3g}; "
                f"{counted(self.steps, 'Adam step')} at lr {self.lr:g} on {counted(len(self.trained), 'module')}; "
                f"{counted(self.samples, 'calibration sample')})")
        if self.reverted:
            text += f"; {self.reverted} undone, as it made the error larger"
        return text


@dataclass(frozen=True)
class Replaced(Generic[D]):
    """A site that was rewritten.

    ``detail`` is the rewrite's own typed record of the site (for a max
    pooling: its window and whether it became a convolution or a fold), read
    by later passes such as ``init="fit"``; ``fit`` says what fitting its
    weights achieved; ``notes`` are sentences for the reader, one per fact.
    """

    rewrite: str
    name: str
    old: str
    new: str
    in_shape: Shape | None
    out_shape: Shape | None
    exact: bool
    module: str = ""
    notes: tuple[str, ...] = ()
    detail: D | None = None
    fit: Fit | None = None
    reconstruction: Reconstruction | None = None


class SkipCause(enum.Enum):
    """Why a site was left alone, where a caller acts on it (``reason`` says it in words for everyone)."""

    UNSIZED = "unsized"  # a size the rewrite needs is not in the graph (an ONNX input without static channels)


@dataclass(frozen=True)
class Skipped:
    """A site that was looked at and left alone, with the reason (and its
    cause where a caller acts on it: the command line refuses an unsized site)."""

    rewrite: str
    name: str
    op: str
    reason: str
    in_shape: Shape | None = None
    out_shape: Shape | None = None
    cause: SkipCause | None = None


@dataclass(frozen=True)
class Untraced:
    """A module whose forward torch.fx could not trace; convify rewrote
    inside its traceable submodules instead."""

    name: str
    reason: str


@dataclass(frozen=True)
class Pass:
    """What one rewrite did to one model."""

    rewrite: str
    options: dict[str, Any] = field(default_factory=dict)
    only: tuple[str, ...] | None = None
    skip: tuple[str, ...] | None = None
    input_shape: Shape | None = None     # the example input it was traced at (one tensor)
    replaced: tuple[Replaced, ...] = ()
    skipped: tuple[Skipped, ...] = ()
    untraced: tuple[Untraced, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Report:
    """All passes applied to a model, oldest first.

    >>> rep = convify.report(convify.replace_maxpool(model))
    >>> print(rep)                      # a table
    >>> [r.name for r in rep.replaced]  # ['maxpool']
    """

    passes: tuple[Pass, ...] = ()

    @property
    def replaced(self) -> tuple[Replaced, ...]:
        return tuple(r for p in self.passes for r in p.replaced)

    @property
    def skipped(self) -> tuple[Skipped, ...]:
        return tuple(s for p in self.passes for s in p.skipped)

    @property
    def untraced(self) -> tuple[Untraced, ...]:
        return tuple(u for p in self.passes for u in p.untraced)

    @property
    def notes(self) -> tuple[str, ...]:
        return tuple(n for p in self.passes for n in p.notes)

    @property
    def last(self) -> Pass:
        return self.passes[-1] if self.passes else Pass(rewrite="none")

    @property
    def exact(self) -> bool:
        """True when every replaced site computes exactly what it replaced."""
        return all(r.exact for r in self.replaced)

    def with_pass(self, new: Pass) -> "Report":
        return Report(self.passes + (new,))

    def since(self, earlier: "Report") -> "Report":
        """The passes added after ``earlier`` (a report this one grew from)."""
        return Report(self.passes[len(earlier.passes):])

    def to_dict(self) -> dict[str, Any]:
        return {"passes": [_pass_to_dict(p) for p in self.passes], "exact": self.exact}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Report":
        """The report :meth:`to_dict` gave (as a pickled model carries it). A
        site's record comes back as its type when the module declaring it is
        loaded (it is whenever something reads it), else as its plain dict."""
        return cls(tuple(_from_plain(Pass, p) for p in data.get("passes", ())))

    def __str__(self) -> str:
        if not self.passes:
            return "convify report: no rewrite applied"
        return "\n\n".join(format_pass(p) for p in self.passes)


def _pass_to_dict(p: Pass) -> dict[str, Any]:
    return {
        "rewrite": p.rewrite,
        "options": {k: _jsonable(v) for k, v in p.options.items()},
        "only": _jsonable(p.only), "skip": _jsonable(p.skip), "input_shape": _jsonable(p.input_shape),
        "replaced": [_jsonable(r) for r in p.replaced],
        "skipped": [_jsonable(s) for s in p.skipped],
        "untraced": [_jsonable(u) for u in p.untraced],
        "notes": list(p.notes),
    }


def _jsonable(value: Any) -> Any:
    """Plain JSON values: dataclasses (typed site records included) as dicts
    with their type's name, enums as their value."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return _jsonable(value.value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        data = {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
        untagged = (Replaced, Skipped, Untraced, Fit, Reconstruction)  # their place in the report says what they are
        return data if isinstance(value, untagged) else {"type": type(value).__name__, **data}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return repr(value)


def _from_plain(hint: Any, value: Any) -> Any:
    """``value`` as :func:`_jsonable` wrote it, read back as ``hint``."""
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return _from_plain(options[0], value) if len(options) == 1 else value
    if origin is tuple and isinstance(value, (list, tuple)):
        items = typing.get_args(hint)
        if len(items) == 2 and items[1] is Ellipsis:
            return tuple(_from_plain(items[0], v) for v in value)
        return tuple(_from_plain(h, v) for h, v in zip(items, value))
    if isinstance(hint, TypeVar):  # a rewrite's own record, tagged with its type's name
        return _record(value)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return hint(value)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint) and isinstance(value, dict):
        hints = typing.get_type_hints(hint)
        return hint(**{f.name: _from_plain(hints[f.name], value[f.name]) for f in dataclasses.fields(hint)
                       if f.name in value})
    return value


def _record(value: Any) -> Any:
    """A tagged record (``{"type": "HeadRecord", ...}``) as its dataclass,
    looked up among the loaded modules of the core, which declares them (no
    import here: the core's rewrites import this module)."""
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        return value
    for name, module in list(sys.modules.items()):
        found = getattr(module, value["type"], None) if name.startswith("convify.core.") else None
        if isinstance(found, type) and dataclasses.is_dataclass(found) and found.__module__ == name:
            return _from_plain(found, value)
    return value


def _shape(shape: Shape | None) -> str:
    return "-" if shape is None else "x".join(str(d) for d in shape)


def format_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A plain fixed-width table (no dependency, reads in logs and terminals)."""
    rows = [list(map(str, r)) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = [line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def format_pass(p: Pass) -> str:
    opts = ", ".join(f"{k}={v!r}" for k, v in p.options.items())
    title = f"convify {p.rewrite}({opts}): {len(p.replaced)} replaced, {len(p.skipped)} skipped"
    parts = [title]
    if p.replaced:
        parts.append(format_table(
            ["site", "old", "new", "in", "out", "exact"],
            [[r.name, r.old, r.new, _shape(r.in_shape), _shape(r.out_shape), "yes" if r.exact else "no"]
             for r in p.replaced],
        ))
    if p.skipped:
        parts.append(format_table(
            ["skipped site", "op", "reason"], [[s.name, s.op, s.reason] for s in p.skipped]
        ))
    if p.untraced:
        parts.append(format_table(
            ["untraceable module", "torch.fx said"], [[u.name or "<model>", u.reason] for u in p.untraced]
        ))
    parts += [f"note: {n}" for n in p.notes]
    for r in p.replaced:
        parts += [f"note: {r.name}: {n}" for n in r.notes]
        if r.fit is not None:
            parts.append(f"note: {r.name}: {r.fit.describe()}")
        if r.reconstruction is not None:
            parts.append(f"note: {r.name}: {r.reconstruction.describe()}")
    return "\n".join(parts)


class _Carried:
    """How a model carries its report: the :class:`Report` in memory; plain
    data (:meth:`Report.to_dict`) when the model is pickled, so that loading
    the pickle needs no convify (``torch.load`` of a model that names
    convify's classes fails where convify is not installed)."""

    __slots__ = ("report",)

    def __init__(self, rep: Report) -> None:
        self.report = rep

    def __reduce__(self) -> tuple[Any, ...]:
        return (dict, (self.report.to_dict(),))

    def __copy__(self) -> "_Carried":
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> "_Carried":
        return self  # a report is immutable


def _carried(found: Any) -> Report | None:
    if isinstance(found, _Carried):
        return found.report
    if isinstance(found, Report):  # pickled by 0.2.0, which kept the Report itself
        return found
    if isinstance(found, dict) and isinstance(found.get("passes"), list):  # read back from a pickle
        return Report.from_dict(found)
    return None


def report(model: "nn.Module") -> Report:
    """The report of every convify rewrite applied to ``model`` (empty if none).

    >>> rewritten = convify.replace_maxpool(torchvision.models.resnet18())
    >>> print(convify.report(rewritten))
    """
    found = _carried(getattr(model, REPORT_ATTR, None))
    if found is None:  # a GraphModule's deepcopy keeps only its ``meta`` of such extras
        meta = getattr(model, "meta", None)
        found = _carried(meta.get(REPORT_ATTR)) if isinstance(meta, dict) else None
    return found if found is not None else Report()


def attach(model: "nn.Module", rep: Report) -> None:
    # A plain attribute (not a buffer): it travels with deepcopy and pickle but
    # never into the state_dict. A torch.fx GraphModule rebuilds itself on
    # deepcopy and keeps only its ``meta`` dict: the report goes there too.
    carried = _Carried(rep)
    object.__setattr__(model, REPORT_ATTR, carried)
    meta = getattr(model, "meta", None)
    if isinstance(meta, dict):
        meta[REPORT_ATTR] = carried
