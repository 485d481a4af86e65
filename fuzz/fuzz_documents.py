"""atheris: manifests, indexes and image configs as a registry may send them."""

from __future__ import annotations

import contextlib

import atheris
from _common import run

with atheris.instrument_imports():
    from hypeman_images.errors import HypemanError
    from hypeman_images.oci.spec import (
        INDEX_TYPES,
        MANIFEST_TYPES,
        media_type_of,
        parse_config,
        parse_manifest_or_index,
    )

TYPES = sorted(INDEX_TYPES) + sorted(MANIFEST_TYPES)


def check(data: bytes) -> None:
    for parse in (
        lambda: media_type_of(data, None),
        lambda: parse_manifest_or_index(data, TYPES[len(data) % len(TYPES)]),
        lambda: parse_config(data),
    ):
        with contextlib.suppress(HypemanError):
            parse()


if __name__ == "__main__":
    run(check)
