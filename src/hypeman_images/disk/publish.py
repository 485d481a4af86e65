"""A disk appears at its path whole or not at all.

It is written to a temp file beside its final path (so the rename stays in
one filesystem), fsynced, renamed into place and its directory fsynced; a
build that fails removes the temp file. Disk-full and other ``OSError``s
become :class:`StorageError` here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from hypeman_images.errors import StorageError
from hypeman_images.fsutil import FILE_MODE, fsync_dir, temp_prefix


@contextlib.contextmanager
def temp_disk(dest: Path) -> Iterator[Path]:
    """A temp file beside ``dest``, removed if the block fails (OSError: StorageError)."""
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(dest.name), dir=dest.parent)
        os.close(fd)
    except OSError as exc:
        raise _storage_error(exc, f"cannot create a temp file in {dest.parent}") from exc
    tmp = Path(tmp_name)
    try:
        yield tmp
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _storage_error(exc, f"cannot write the disk {dest}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def commit(tmp: Path, dest: Path) -> None:
    """fsync the file, rename it into place, fsync the directory."""
    with tmp.open("rb+") as handle:
        os.fsync(handle.fileno())
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, dest)
    fsync_dir(dest.parent)


def _storage_error(exc: OSError, doing: str) -> StorageError:
    if exc.errno == errno.ENOSPC:
        return StorageError(f"the data dir's filesystem is full: {doing}: {exc.strerror}")
    return StorageError(f"{doing}: {exc.strerror}")
