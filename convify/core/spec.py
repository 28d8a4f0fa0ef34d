"""What a rewrite is, independent of any graph type.

A :class:`RewriteSpec` names a rewrite and declares its options, the keyword
that chooses its ``mode``, its place in ``convify.convify``'s order and the
ONNX op types it removes. Frontends (``convify.fx``) implement a spec on
their own graphs; everything that only needs to know which rewrites exist
(the command line's flags, checkpoint recipes, ``verify``'s census) reads
the spec.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from convify.core.options import RewriteOptions
from convify.core.report import Replaced
from convify.errors import UsageError


def _one_op_per_site(row: Replaced) -> int:
    return 1


@dataclass(frozen=True)
class RewriteSpec:
    """A rewrite, declared once.

    ``Options``: a :class:`~convify.core.options.RewriteOptions` subclass
    with a ``mode`` field; ``keyword``: the name under which
    ``convify.convify`` (and the command line, ``--KEYWORD``) chooses that
    mode (None leaves the rewrite out); its other fields appear under their
    own names. ``order``: position among the passes (lower runs first).
    ``onnx_ops``: the ONNX op types it removes, which ``verify``'s census
    checks, and ``onnx_ops_removed(row)`` how many one replaced site removes;
    ``onnx_ops_not_added``: op types its sites must not bring in (the
    census checks the rewritten graph holds no more of them than the
    original: a max pooling's replacement computes no max in disguise).
    """

    name: str
    Options: type[RewriteOptions]
    keyword: str
    summary: str = ""
    order: int = 100
    onnx_ops: tuple[str, ...] = ()
    onnx_ops_removed: Callable[[Replaced], int] = _one_op_per_site
    onnx_ops_not_added: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if "mode" not in {f.name for f in dataclasses.fields(self.Options)}:
            raise UsageError(f"rewrite {self.name!r}: its Options need a 'mode' field, chosen by "
                             f"convify({self.keyword}=...)")
        self.Options.rewrite = self.name

    def keywords(self) -> list[str]:
        """The keywords of ``convify.convify`` its options appear as: its
        ``keyword`` for ``mode``, then its other fields by name."""
        return [self.keyword_of(f.name) for f in dataclasses.fields(self.Options)]

    def keyword_of(self, field_name: str) -> str:
        """The keyword (and command-line flag) of one option field."""
        return self.keyword if field_name == "mode" else field_name

    def checked_options(self, options: RewriteOptions | None, values: Mapping[str, Any]) -> RewriteOptions:
        """The options a frontend's rewrite is made with: an ``Options``
        object or keywords for one, not both; ``UsageError`` otherwise."""
        if options is not None and values:
            raise UsageError(f"{self.name}: give options as an Options object or as keywords, not both")
        made = options if options is not None else self.Options(**values)
        if not isinstance(made, self.Options):
            raise UsageError(f"{self.name}: options must be {self.Options.__name__}, not {type(made).__name__}")
        return made

    def options_from_keywords(self, values: Mapping[str, Any]) -> RewriteOptions | None:
        """Its options from ``convify.convify`` keywords (absent ones take
        their defaults); None when its keyword is None (leave it out)."""
        args = {f.name: values[self.keyword_of(f.name)] for f in dataclasses.fields(self.Options)
                if self.keyword_of(f.name) in values}
        if args.get("mode", "") in (None, "none"):
            return None
        options = self.Options(**args)
        return None if options.mode is None else options  # a rewrite whose mode defaults to None is opt-in
