"""atheris: a disk cache's artifact manifests and configs, and a registry's error bodies."""

from __future__ import annotations

import contextlib

import atheris
from _common import run

with atheris.instrument_imports():
    from hypeman_images.errors import HypemanError
    from hypeman_images.fleet.artifact import parse_manifest
    from hypeman_images.fleet.config import DiskConfig
    from hypeman_images.oci.digest import Digest
    from hypeman_images.registry.responses import error_details


def check(data: bytes) -> None:
    error_details(data)  # never raises: a body it cannot read is the status alone
    for parse in (
        lambda: parse_manifest(data, Digest.of(data)),
        lambda: DiskConfig.parse(data),
    ):
        with contextlib.suppress(HypemanError):
            parse()


if __name__ == "__main__":
    run(check)
