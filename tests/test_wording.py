"""convify.wording: a count and its noun agree, and no message in the package words a count any other way."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from convify.wording import counted, noun

PACKAGE = Path(__file__).resolve().parent.parent / "convify"


@pytest.mark.parametrize("n, words, said", [
    (0, ("tile",), "0 tiles"), (1, ("tile",), "1 tile"), (2, ("tile",), "2 tiles"),
    (1, ("max pooling",), "1 max pooling"), (4, ("max pooling",), "4 max poolings"),
    (1, ("class", "classes"), "1 class"), (10, ("class", "classes"), "10 classes"),
])
def test_counted_agrees_with_its_number(n, words, said):
    assert counted(n, *words) == said
    assert noun(n, *words) == said.split(" ", 1)[1]


# A count written straight into a plural noun ("{len(sites)} sites", "{n} tiles"), or a "(s)" plural.
_FIXED_PLURAL = re.compile(r"\{(len\([^{}]*\)|n|k|count|pools|channels|ndim|removed)(:[^{}]*)?\}\s+[a-z]+s\b"
                           r"|[a-z]{2,}\(s\)(?! for)[ )]")


def test_no_message_words_a_count_as_a_fixed_plural():
    found = [f"{p.relative_to(PACKAGE)}:{i}: {line.strip()}"
             for p in sorted(PACKAGE.rglob("*.py")) for i, line in enumerate(p.read_text().splitlines(), 1)
             if _FIXED_PLURAL.search(line) and not line.lstrip().startswith("#")]
    assert found == [], "\n".join(found)
