"""Files in the boot cache appear whole or not at all (temp file, fsync, rename)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from hypeman_images.fsutil import atomic_writer


def write_atomic(target: Path, chunks: Iterable[bytes]) -> Path:
    """Write ``chunks`` to ``target`` through :func:`fsutil.atomic_writer`, making its directory.

    Concurrent writers of the same content are safe: each has its own temp
    file, the last rename wins and readers never see a partial file.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(target) as out:
        for chunk in chunks:
            out.write(chunk)
    return target
