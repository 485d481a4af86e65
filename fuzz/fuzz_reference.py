"""atheris: image references and digests (user input from the CLI and the API)."""

from __future__ import annotations

from pathlib import Path

import atheris
from _common import run

with atheris.instrument_imports():
    from hypeman_images.oci.digest import Digest
    from hypeman_images.oci.reference import parse_reference
    from hypeman_images.store.images import ImageStore

ROOT = Path("/nonexistent/images")


def check(data: bytes) -> None:
    text = atheris.FuzzedDataProvider(data).ConsumeUnicodeNoSurrogates(len(data))
    try:
        Digest.parse(text)
    except Exception as exc:
        from hypeman_images.errors import HypemanError

        if not isinstance(exc, HypemanError):
            raise
    ref = parse_reference(text)
    assert parse_reference(str(ref)) == ref
    store = object.__new__(ImageStore)
    store.root = ROOT
    directory = store.digest_dir(ref, ref.digest or Digest("sha256", "0" * 64))
    assert ".." not in directory.relative_to(ROOT).parts


if __name__ == "__main__":
    run(check)
