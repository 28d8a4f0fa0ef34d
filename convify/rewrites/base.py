"""The one mechanism every rewrite plugs into.

A rewrite is a :class:`Rewrite` subclass in its own file under
``convify/rewrites/``, registered with :func:`register`. Everything the rest
of convify needs to know about it is declared on the class, once:

* ``Options``: a frozen dataclass of its options, each field made with
  :func:`option` (default, help, choices); ``convify.convify``'s keywords, the
  command line's flags and the checkpoint recipe are built from it;
* ``keyword``: the name under which ``convify.convify`` (and the command line,
  ``--KEYWORD``) chooses the rewrite's ``mode``; ``None`` there leaves the
  rewrite out;
* ``leaf_modules``: module classes the tracer keeps as one call (the sites);
* ``onnx_ops``: the ONNX op types it removes, which ``verify``'s census checks.

It finds its :class:`Site` s in a shape-propagated graph (each with a skip
reason when it must be left alone) and applies itself to one site at a time,
returning a :class:`~convify.report.Replaced` row whose ``detail`` is the
rewrite's own typed record (a record that names modules implements
:class:`NamesModules`). The engine (``convify.engine``) does the rest for
all of them: copying, tracing with a fallback for untraceable models,
``only``/``skip`` filtering, giving each call of a shared module its own name,
graph hygiene. Rewrites that can use calibration data implement
:meth:`Rewrite.calibrate`, which reads the typed records of the pass.
"""
from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Mapping, Protocol, Sequence, runtime_checkable

import torch.fx as fx
import torch.nn as nn

from ..errors import OptionError, UsageError
from ..report import Pass, Replaced

REGISTRY: dict[str, type["Rewrite"]] = {}

#: Keywords of ``convify.convify`` that belong to the engine, not to a rewrite.
ENGINE_KEYWORDS = frozenset({"model", "example_input", "only", "skip", "calibration", "inplace"})


def option(default: Any, help: str, choices: Sequence[Any] | None = None) -> Any:
    """A field of a rewrite's ``Options``: its default, one line of help (the
    CLI shows it) and, for a string option, the values it takes."""
    return field(default=default, metadata={"help": help, "choices": tuple(choices) if choices else None})


@dataclass(frozen=True)
class RewriteOptions:
    """Base of every rewrite's options. Values are checked when made: a value
    outside a field's ``choices``, or a non-bool for a bool field, raises
    :class:`~convify.errors.OptionError` naming the rewrite and the field."""

    rewrite: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            choices = f.metadata.get("choices")
            if choices is not None and value not in choices:
                raise OptionError(f"{self.rewrite}: {f.name} must be one of "
                                  f"{', '.join(repr(c) for c in choices)}, not {value!r}")
            if isinstance(f.default, bool) and not isinstance(value, bool):
                raise OptionError(f"{self.rewrite}: {f.name} must be True or False, not {value!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "RewriteOptions":
        """Options from plain values (a recipe's); unknown names are refused."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise OptionError(f"{cls.rewrite}: unknown options {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def calibration_option(self) -> tuple[str, Any] | None:
        """The option (name, value) that cannot be honoured without
        calibration data (``("init", "fit")``), or None."""
        return None

    def needs_calibration(self) -> bool:
        return self.calibration_option() is not None

    def wants_calibration(self) -> bool:
        """Whether this pass fits weights on calibration data when given some."""
        return self.needs_calibration()

    def for_rebuild(self) -> "RewriteOptions":
        """The options that build the same modules without calibration data
        (a checkpoint's weights are loaded into them afterwards)."""
        return self


@dataclass
class Site:
    """One place in a graph a rewrite looked at.

    ``name`` is the stable qualified name users match with ``only``/``skip``:
    the module path for a module call (``pool``, then ``pool@1`` for its second
    call), or the calling module's path plus the function name for a
    functional call (``features.max_pool2d``).
    """

    name: str
    node: fx.Node
    op: str
    skip_reason: str | None = None
    params: Any = None


@runtime_checkable
class NamesModules(Protocol):
    """A site record (``Replaced.detail``) that names modules of the graph it
    was made in. The engine qualifies those names with the path of the
    submodule whose graph it was (as it does ``Replaced.name`` and
    ``module``), so that the record names modules of the whole model."""

    def with_prefix(self, prefix: str) -> Any: ...


class Rewrite(abc.ABC):
    """Base class of the rewrites; see the module docstring for what a
    subclass declares. Subclasses implement :meth:`find_sites` and :meth:`apply`."""

    name: ClassVar[str]
    Options: ClassVar[type[RewriteOptions]]
    keyword: ClassVar[str]
    #: One line for ``convify --help`` and the report.
    summary: ClassVar[str] = ""
    #: Position among the passes of ``convify.convify`` (lower runs first).
    order: ClassVar[int] = 100
    leaf_modules: ClassVar[tuple[type[nn.Module], ...]] = ()
    onnx_ops: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: RewriteOptions | None = None, **values: Any) -> None:
        if options is not None and values:
            raise UsageError(f"{self.name}: give options as an Options object or as keywords, not both")
        self.options = options if options is not None else self.Options(**values)
        if not isinstance(self.options, self.Options):
            raise UsageError(f"{self.name}: options must be {self.Options.__name__}, "
                             f"not {type(self.options).__name__}")

    # ---------------------------------------------------------------- finding and applying

    @abc.abstractmethod
    def find_sites(self, gm: fx.GraphModule) -> list[Site]:
        """Every site in ``gm`` (shapes in ``node.meta``), in graph order."""

    @abc.abstractmethod
    def apply(self, gm: fx.GraphModule, site: Site) -> Replaced:
        """Rewrite one site in place; names in the returned row are local to ``gm``."""

    def is_site_module(self, module: nn.Module) -> bool:
        """True for modules that are a site by themselves (the fallback wraps
        them when an untraceable parent calls them directly)."""
        return bool(self.leaf_modules) and isinstance(module, self.leaf_modules)

    def is_site_function(self, func: Callable) -> bool:
        """True for functions that would be sites; used to report such calls
        made from code torch.fx could not trace."""
        return False

    def describe_function(self, func: Callable) -> str:
        return getattr(func, "__name__", repr(func))

    def nothing_found(self, model: nn.Module) -> str:
        """The report note when ``model`` has no site at all."""
        return f"no {self.name} site found in the forward: nothing to rewrite"

    def finish(self, gm: fx.GraphModule, rows: Sequence[Replaced]) -> list[str]:
        """Called once after all sites of ``gm`` were applied (``rows``: what
        they became); returns notes for the pass."""
        return []

    # ---------------------------------------------------------------- after the rewrite

    def calibrate(self, teacher: nn.Module | None, model: nn.Module, done: Pass,
                  calibration: Sequence[Any]) -> Pass:
        """Fit the new weights of ``model`` on ``calibration`` batches, reading
        the typed records of ``done`` (this rewrite's pass); ``teacher`` is the
        model before any rewrite (None when it could not be kept). Returns
        the pass with its rows and notes updated. By default: nothing to fit."""
        return done

    @classmethod
    def onnx_ops_removed(cls, row: Replaced) -> int:
        """How many of :attr:`onnx_ops` one replaced site removes from an ONNX graph."""
        return 1


def register(cls: type[Rewrite]) -> type[Rewrite]:
    """Class decorator: make a rewrite available by its ``name``, and its
    options as keywords of ``convify.convify`` (which must not clash)."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise UsageError(f"two rewrites are named {cls.name!r}: {REGISTRY[cls.name]} and {cls}")
    if "mode" not in {f.name for f in dataclasses.fields(cls.Options)}:
        raise UsageError(f"rewrite {cls.name!r}: its Options need a 'mode' field, chosen by "
                         f"convify({cls.keyword}=...)")
    cls.Options.rewrite = cls.name
    taken = {k: name for name, other in REGISTRY.items() if other is not cls for k in keywords(other)}
    for key in keywords(cls):
        if key in ENGINE_KEYWORDS or key in taken:
            owner = taken.get(key, "the engine")
            raise UsageError(f"rewrite {cls.name!r}: keyword {key!r} is already taken by {owner}; rename the "
                             "option (convify.convify, the command line and recipes need unique names)")
    REGISTRY[cls.name] = cls
    return cls


def keywords(cls: type[Rewrite]) -> list[str]:
    """The keywords of ``convify.convify`` a rewrite's options appear as:
    its ``keyword`` for ``mode``, then its other fields by name."""
    return [cls.keyword if f.name == "mode" else f.name for f in dataclasses.fields(cls.Options)]


def leaf_modules() -> tuple[type[nn.Module], ...]:
    """Every registered rewrite's site modules: the tracer keeps them as one
    call in every pass, so a rewritten model retraces to the same graph."""
    return tuple(dict.fromkeys(m for cls in in_order() for m in cls.leaf_modules))


def in_order() -> list[type[Rewrite]]:
    """The registered rewrites in the order ``convify.convify`` applies them."""
    return sorted(REGISTRY.values(), key=lambda cls: cls.order)


def options_from_keywords(cls: type[Rewrite], values: Mapping[str, Any]) -> RewriteOptions | None:
    """A rewrite's options from ``convify.convify`` keywords (absent ones take
    their defaults); None when its keyword is None (leave the rewrite out)."""
    args: dict[str, Any] = {}
    for f in dataclasses.fields(cls.Options):
        key = cls.keyword if f.name == "mode" else f.name
        if key in values:
            args[f.name] = values[key]
    if args.get("mode", "") in (None, "none"):
        return None
    options = cls.Options(**args)
    return None if options.mode is None else options  # a rewrite whose mode defaults to None is opt-in


def all_keywords() -> list[str]:
    return [k for cls in in_order() for k in keywords(cls)]


def unknown_keywords(given: Iterable[str]) -> list[str]:
    known = set(all_keywords())
    return sorted(k for k in given if k not in known)
