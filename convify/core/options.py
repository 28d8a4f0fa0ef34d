"""A rewrite's options: a frozen dataclass whose fields are made with :func:`option`.

``convify.convify``'s keywords, the command line's flags and the checkpoint
recipe are all built from these fields, so an option is declared once.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

from convify.errors import OptionError


def option(default: Any, help: str | Callable[[], str], choices: Sequence[Any] | Mapping[str, Any] | None = None,
           *, off_flag: str | None = None) -> Any:
    """A field of a rewrite's ``Options``: its default, one line of help (the
    CLI shows it; a callable when it lists a registry) and, for a string option, the values it takes. ``choices``
    may be a registry (a mapping read each time it is asked, so that values
    registered later, such as a new pooling mode, are taken). ``off_flag``:
    for a bool option that defaults to True, the command line's flag that
    turns it off (``"ungrouped"`` gives ``--ungrouped``)."""
    if choices is not None and not isinstance(choices, Mapping):
        choices = tuple(choices)
    if off_flag is not None and default is not True:
        raise TypeError(f"off_flag is for a bool option that defaults to True, not to {default!r}")
    return field(default=default, metadata={"help": help, "choices": choices, "off_flag": off_flag})


def off_flag_of(f: dataclasses.Field) -> str | None:
    """The flag name that turns a default-True option off, or None."""
    return f.metadata.get("off_flag")


def help_of(f: dataclasses.Field) -> str:
    """An option's line of help."""
    text = f.metadata.get("help", "")
    return text() if callable(text) else text


def choices_of(f: dataclasses.Field) -> tuple[Any, ...] | None:
    """The values an option takes now (None: any value of its type)."""
    choices = f.metadata.get("choices")
    return None if choices is None else tuple(choices)


@dataclass(frozen=True)
class RewriteOptions:
    """Base of every rewrite's options. Values are checked when made: a value
    outside a field's ``choices``, or a non-bool for a bool field, raises
    :class:`~convify.errors.OptionError` naming the rewrite and the field."""

    rewrite: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            choices = choices_of(f)
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

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every field's default, by name (the entry points take theirs from here)."""
        return {f.name: f.default for f in dataclasses.fields(cls)}

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
