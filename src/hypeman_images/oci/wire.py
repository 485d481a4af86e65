"""JSON documents and decimal numbers as another party wrote them, with one way to fail.

Manifests, configs, referrers indexes, error bodies, token answers, header
values and annotations come from registries and clients this process does
not trust. Python rejects bad input to ``json.loads`` in more ways than its
``JSONDecodeError``: bytes that are not UTF-8 (``UnicodeDecodeError``), a
number of more than ``sys.get_int_max_str_digits()`` digits (a plain
``ValueError``, the guard CPython added against quadratic ``int()``), and
arrays nested past the interpreter's stack (``RecursionError``). And
``str.isdigit`` accepts characters ``int`` refuses (``"²"``). Read through
here, every one of those is a ``ValueError`` or a ``None``, which each caller
turns into its own error (tests/oci/test_wire.py, tests/layers/test_fuzz.py).
"""

from __future__ import annotations

import json
import sys
from typing import Any

# 2**64 - 1 has 20 digits: every size, offset and length a registry or client
# states fits in that, and a longer "number" is refused before int() reads it.
MAX_DECIMAL_DIGITS = 20


def load_json(data: bytes | bytearray | str) -> Any:
    """``json.loads(data)``; whatever is wrong with ``data``, a :class:`ValueError` saying what."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("nested too deeply to parse") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise
    except ValueError:
        limit = sys.get_int_max_str_digits()
        raise ValueError(f"holds a number of more than {limit} digits") from None


def decimal(text: str, max_digits: int = MAX_DECIMAL_DIGITS) -> int | None:
    """``text`` as a number of ASCII digits only, at most ``max_digits`` of them; else None."""
    if not text or len(text) > max_digits or not (text.isascii() and text.isdigit()):
        return None
    return int(text)


__all__ = ["MAX_DECIMAL_DIGITS", "decimal", "load_json"]
