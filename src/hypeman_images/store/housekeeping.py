"""Housekeeping of build directories: is a build alive, what did a dead one leave.

The pipeline holds a digest directory's ``.lock`` flock for a whole build, in
whichever process runs it, and the kernel drops the lock when that process
dies. So "the lock is free" means "nobody builds here now", with no pid files
and no heartbeat; recovery and gc touch a build directory only while holding
that lock themselves.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from hypeman_images.errors import HypemanError
from hypeman_images.fsutil import TEMP_PREFIX, storage_error, writer_alive
from hypeman_images.oci.digest import Digest
from hypeman_images.store.formats import RECORD_FILES
from hypeman_images.store.images import (
    LOCK_NAME,
    ImageRecord,
    ImageStatus,
    digest_dirs,
    read_record,
    tree_size,
)


def build_dirs(root: Path) -> Iterator[tuple[Path, str]]:
    """Every build directory under the image store ``root``, readable record or not,
    with its repository (``registry/repository``)."""
    for path in digest_dirs(root):
        yield path, path.parent.relative_to(root).as_posix()


def remove_dangling_tags(root: Path) -> None:
    """Tag links whose build directory is gone (e.g. a failed rebuild that gc removed)."""
    for top, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(top) / name
            if name.startswith(TEMP_PREFIX) or not path.is_symlink() or path.exists():
                continue
            path.unlink(missing_ok=True)
        dirs[:] = [d for d in dirs if not (Path(top) / d).is_symlink()]


@contextlib.contextmanager
def idle_lock(directory: Path) -> Iterator[bool]:
    """Hold a build directory's lock if no build holds it (True), else yield False.

    The pipeline holds this flock for a whole build, in this process or
    another; the kernel drops it when a process dies, so "idle" also means
    "whoever built here is gone" without any pid bookkeeping.
    """
    try:
        handle = open(directory / LOCK_NAME, "a+b")  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        yield False  # the directory went away: nothing here to touch
        return
    except OSError as exc:
        raise storage_error(exc, f"cannot lock {directory}") from exc
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def sweep_build_dir(directory: Path) -> int:
    """Remove everything but the disks, the records and the lock from an idle build dir.

    What else is there was left by a dead build: mke2fs's temp disk
    (``.rootfs.ext4.*.tmp``), the fallback's staging dir, metadata temp files.
    """
    freed = 0
    for entry in directory.iterdir():
        if entry.name in RECORD_FILES or entry.name == LOCK_NAME:
            continue
        if entry.name.startswith(TEMP_PREFIX) and writer_alive(entry.name):
            continue
        freed += tree_size(entry)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    return freed


def blobs_needed(record: ImageRecord | None) -> set[Digest]:
    """The blobs a record needs: its manifest, config and layers."""
    if record is None or record.status is ImageStatus.FAILED:
        return set()
    names = [
        record.digest,
        *([record.config_digest] if record.config_digest else []),
        *record.layers,
    ]
    out: set[Digest] = set()
    for name in names:
        with contextlib.suppress(HypemanError):
            out.add(Digest.parse(name))
    return out


__all__ = [
    "blobs_needed",
    "build_dirs",
    "idle_lock",
    "read_record",
    "remove_dangling_tags",
    "sweep_build_dir",
    "tree_size",
]
