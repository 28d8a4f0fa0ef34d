"""Example inputs: arguments, probing, shapes."""
from __future__ import annotations

import pytest

from convify.errors import UsageError
from convify.inputs import parse_input_shape


@pytest.mark.parametrize("text, shape", [("1,3,64,64", (1, 3, 64, 64)), ("2x3x8x9", (2, 3, 8, 9)),
                                         (" 1, 3, 32 ", (1, 3, 32)), ([1, 3, 5, 5], (1, 3, 5, 5))])
def test_parse_input_shape(text, shape):
    assert parse_input_shape(text) == shape


@pytest.mark.parametrize("text", ["1,3,a,4", "1,3", "1,3,0,4", "1,3,-2,4", ""])
def test_parse_input_shape_refuses(text):
    with pytest.raises(UsageError, match="malformed input shape"):
        parse_input_shape(text)
