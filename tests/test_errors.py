"""`errors.quote`: what a message quotes of a file stays one short line whatever the file holds."""

import math

from ideogram4_gguf.errors import QUOTE_LIMIT, quote


def test_short_values_are_their_repr():
    assert quote("qwen2") == "'qwen2'" and quote(5e6) == "5000000.0" and quote(math.nan) == "nan"
    assert quote([24, 20, 20]) == "[24, 20, 20]" and quote((1, 2)) == "(1, 2)" and quote(None) == "None"


def test_long_values_are_cut_with_their_size():
    assert quote("x" * 65536) == "'" + "x" * (QUOTE_LIMIT - 4) + "... (65536 characters)"
    assert quote(list(range(3000))) == "[0, 1, 2, 3, ... (3000 items)]"
    assert len(quote(["y" * 10000] * 3)) <= QUOTE_LIMIT
    assert len(quote(b"\xff" * 1000)) < QUOTE_LIMIT + 30


def test_one_line_always():
    assert "\n" not in quote("a\nb") and "\n" not in quote(["a\nb"]) and "\n" not in quote(b"\r\n")
