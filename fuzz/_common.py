"""Shared by the atheris targets: run ``check`` and let only HypemanError pass."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable

import atheris

with atheris.instrument_imports():
    from hypeman_images.errors import HypemanError


def run(check: Callable[[bytes], None]) -> None:
    """Fuzz ``check``; any exception but a HypemanError is reported as a crash."""

    def one_input(data: bytes) -> None:
        with contextlib.suppress(HypemanError):
            check(data)

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
