"""How convify words a count: ``1 tile``, ``3 tiles``. One place, so that no message says ``1 tiles``."""
from __future__ import annotations


def noun(n: int, singular: str, plural: str | None = None) -> str:
    """The noun in the number ``n`` takes (``plural`` where adding an s is wrong).

    >>> noun(1, "rewrite"), noun(2, "rewrite"), noun(2, "class", "classes")
    ('rewrite', 'rewrites', 'classes')
    """
    return singular if n == 1 else plural or singular + "s"


def counted(n: int, singular: str, plural: str | None = None) -> str:
    """``n`` and the noun in the number ``n`` takes.

    >>> counted(1, "tile"), counted(3, "tile"), counted(2, "class", "classes")
    ('1 tile', '3 tiles', '2 classes')
    """
    return f"{n} {noun(n, singular, plural)}"
