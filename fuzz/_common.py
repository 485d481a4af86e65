"""Shared by the atheris targets: run ``check`` and let only HypemanError pass."""

from __future__ import annotations

import sys
from collections.abc import Callable

import atheris

with atheris.instrument_imports():
    from hypeman_images.errors import HypemanError


def run(check: Callable[[bytes], None]) -> None:
    """Fuzz ``check``; any exception but a HypemanError is reported as a crash."""

    def one_input(data: bytes) -> None:
        try:
            check(data)
        except HypemanError:
            pass

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
