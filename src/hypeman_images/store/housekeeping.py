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
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from hypeman_images.errors import HypemanError
from hypeman_images.fsutil import (
    TEMP_PREFIX,
    discard,
    process_alive,
    quarantine,
    storage_error,
    writer_alive,
)
from hypeman_images.oci.digest import SHA256_HEX, Digest
from hypeman_images.store.formats import RECORD_FILES, DiskFormat
from hypeman_images.store.images import (
    DELETING_PREFIX,
    LOCK_NAME,
    ImageRecord,
    ImageStatus,
    ImageStore,
    StoredImage,
    digest_dirs,
    read_record,
    read_records,
)


def build_dirs(root: Path) -> Iterator[tuple[Path, str]]:
    """Every build directory under the image store ``root``, readable record or not,
    with its repository (``registry/repository``)."""
    for path in digest_dirs(root):
        yield path, path.parent.relative_to(root).as_posix()


def remove_dangling_tags(root: Path) -> None:
    """Tag links whose build directory is gone (e.g. a failed rebuild that gc removed).

    Only links that look like tags (a digest's hex) are touched, and the walk
    enters neither build directories nor leftovers, whatever their depth.
    """
    for top, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(top) / name
            if name.startswith(TEMP_PREFIX) or not path.is_symlink() or path.exists():
                continue
            with contextlib.suppress(OSError):
                if SHA256_HEX.fullmatch(os.readlink(path)):
                    path.unlink()
        dirs[:] = [
            d
            for d in dirs
            if not d.startswith((TEMP_PREFIX, DELETING_PREFIX))
            and not SHA256_HEX.fullmatch(d)
            and not (Path(top) / d).is_symlink()
        ]


def quarantine_unreadable(store: ImageStore) -> None:
    """Move each idle build dir whose records cannot be read to the quarantine.

    Nothing can resume or show such a build, and it must not stop recovery
    (docs/security.md, "Deep trees and leftovers"); it is kept for a person to read.
    Beside a readable record of another format, only the unreadable record and
    its disk go.
    """
    for directory, repository in build_dirs(store.root):
        bad = [
            f
            for f in DiskFormat
            if (directory / f.metadata_name).exists() and read_record(directory, f) is None
        ]
        if not bad:
            continue
        label = f"{repository}/{directory.name}"
        with idle_lock(directory) as free:
            if not free:
                continue
            if not read_records(directory):
                quarantine(directory, store.quarantine, label)
                continue
            for fmt in bad:
                for name in (fmt.metadata_name, fmt.disk_name):
                    if (directory / name).exists():
                        quarantine(directory / name, store.quarantine, f"{label}/{name}")


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


def sweep_build_dir(directory: Path, quarantine: Path | None = None) -> int:
    """Remove everything but the disks, the records and the lock from an idle build dir.

    What else is there was left by a dead build: mke2fs's temp disk
    (``.rootfs.ext4.*.tmp``), the fallback's staging dir, metadata temp files.
    What cannot be removed is logged and moved to ``quarantine``. Bytes freed.
    """
    freed = 0
    for entry in directory.iterdir():
        if entry.name in RECORD_FILES or entry.name == LOCK_NAME:
            continue
        if entry.name.startswith(TEMP_PREFIX) and writer_alive(entry.name):
            continue
        label = f"{directory.parent.name}/{directory.name}/{entry.name}"
        freed += discard(entry, quarantine, label)
    return freed


INTERRUPTED = (
    "interrupted: the process that was building it ended before it finished; "
    "pull it again (serve resumes it when it starts), or gc removes it"
)


def writer_gone(record: ImageRecord) -> bool:
    """A queued or running record whose writing process is gone (or unknown: older records)."""
    return record.status.active and (record.writer is None or not process_alive(record.writer))


def abandoned(record: ImageRecord | None) -> bool:
    """What gc removes from an idle build dir: no readable record, failed, or interrupted."""
    return record is None or record.status is ImageStatus.FAILED or writer_gone(record)


def interrupted(directory: Path, record: ImageRecord) -> bool:
    """Is ``record`` a build nobody will finish: writer gone and build lock free?"""
    if not writer_gone(record):
        return False
    try:
        with idle_lock(directory) as free:
            return free
    except HypemanError:
        return False  # cannot tell (e.g. no permission to open the lock): as recorded


def settled(stored: StoredImage) -> StoredImage:
    """``stored`` as it is: an interrupted build shows as failed with :data:`INTERRUPTED`.

    Only the view changes; the record stays, for ``serve``'s recovery to resume
    (docs/security.md, "Interrupted builds").
    """
    if not interrupted(stored.directory, stored.record):
        return stored
    record = replace(stored.record, status=ImageStatus.FAILED, error=INTERRUPTED)
    return replace(stored, record=record)


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
    "INTERRUPTED",
    "abandoned",
    "blobs_needed",
    "build_dirs",
    "idle_lock",
    "interrupted",
    "quarantine_unreadable",
    "read_record",
    "remove_dangling_tags",
    "settled",
    "sweep_build_dir",
    "writer_gone",
]
