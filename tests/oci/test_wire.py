"""Reading what another party wrote: every malformation is a ValueError or a None."""

from __future__ import annotations

import json
import sys

import pytest

from hypeman_images.oci.wire import MAX_DECIMAL_DIGITS, decimal, load_json

LONG = b"9" * (sys.get_int_max_str_digits() + 1)


@pytest.mark.parametrize(
    ("data", "said"),
    [
        pytest.param(b'{"size":' + LONG + b"}", "holds a number of more than", id="long-number"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, "nested too deeply", id="deep"),
        pytest.param(b'{"a":1', "Expecting", id="cut"),
        pytest.param(b'"\xff"', "utf-8", id="not-utf8"),
    ],
)
def test_every_malformed_document_is_a_value_error_saying_what(data: bytes, said: str) -> None:
    with pytest.raises(ValueError, match=said) as caught:
        load_json(data)
    assert "set_int_max_str_digits" not in str(caught.value)  # no advice meant for programmers


def test_a_document_is_read_as_json_reads_it() -> None:
    doc = {"schemaVersion": 2, "size": 10**20, "f": 1e400, "n": None}
    assert load_json(json.dumps(doc)) == json.loads(json.dumps(doc))
    assert load_json(bytearray(b"[1]")) == [1]


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("0", 0),
        ("1024", 1024),
        ("9" * MAX_DECIMAL_DIGITS, 10**MAX_DECIMAL_DIGITS - 1),
        ("9" * (MAX_DECIMAL_DIGITS + 1), None),  # refused before int() reads it
        ("9" * 5000, None),
        ("", None),
        ("-1", None),
        ("+1", None),
        (" 1", None),
        ("1_000", None),  # int() reads it; no header or annotation writes it
        ("²", None),  # str.isdigit says yes, int() says no
        ("٣", None),  # an Arabic-Indic digit: int() reads it as 3
    ],
)
def test_decimal_takes_ascii_digits_only(text: str, number: int | None) -> None:
    assert decimal(text) == number
