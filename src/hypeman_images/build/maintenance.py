"""The data dir's upkeep: gc, recovery after a crash, and verifying a ready disk.

:class:`~hypeman_images.build.manager.ImageManager` runs gc and recovery
under its own lock, and passes what only it knows: the builds queued or
running (whose blobs gc keeps) and how to queue a build again (for recovery).
Neither touches a build dir whose build lock another live process holds;
verification holds that lock while it checks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, MutableSequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from hypeman_images.build.options import BuildOptions
from hypeman_images.build.queue import BuildKey, Job
from hypeman_images.build.records import pending_tags, without_pending_tags
from hypeman_images.errors import Conflict, HypemanError
from hypeman_images.fsutil import discard
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.reference import Reference, parse_reference
from hypeman_images.store.blobs import BlobStore
from hypeman_images.store.formats import DiskFormat
from hypeman_images.store.housekeeping import (
    abandoned,
    blobs_needed,
    build_dirs,
    idle_lock,
    quarantine_unreadable,
    remove_dangling_tags,
    sweep_build_dir,
)
from hypeman_images.store.images import (
    ImageRecord,
    ImageStatus,
    ImageStore,
    StoredImage,
    read_records,
)

if TYPE_CHECKING:
    from hypeman_images.disk.verify import Verified
    from hypeman_images.layers.scancache import ScanCache

log = logging.getLogger(__name__)

_BORROWED = (
    "interrupted by a restart; the credentials it was asked for with are not kept, "
    "so ask for it again with them"
)


@dataclass(frozen=True)
class GcReport:
    """What ``gc`` removed; ``bytes_freed`` counts blobs, build dirs, scans and temp files."""

    blobs_removed: int
    bytes_freed: int
    directories_removed: int = 0
    scans_removed: int = 0


@dataclass(frozen=True)
class RecoveryReport:
    """What ``recover`` found: builds resumed, tag links restored, bytes of leftovers freed."""

    resumed: tuple[str, ...]
    retagged: tuple[str, ...]
    bytes_freed: int


def collect_garbage(store: ImageStore, blobs: BlobStore, active: set[BuildKey]) -> GcReport:
    """Remove what no image needs: failed, interrupted or unreadable build dirs, their
    blobs, leftovers. ``bytes_freed`` counts allocated blocks (sparse disks as they are).

    Blobs of ready builds and of builds queued or running (the ``active`` ones
    here, or in another live process) are kept. A digest with an abandoned (or
    unreadable) record of one disk format and a good one of another loses only
    the abandoned disk's files. A build dir that cannot be locked or removed is
    logged and skipped, its blobs kept: one leftover must not stop gc
    (docs/security.md, "Deep trees and leftovers").
    """
    keep: set[Digest] = set()
    freed = removed_dirs = 0
    for directory, repository in build_dirs(store.root):
        digest = Digest("sha256", directory.name)
        records: list[ImageRecord] | None = read_records(directory)
        if not any(BuildKey(repository, digest, f) in active for f in DiskFormat):
            try:
                freed_here, records = _collect_build_dir(store, directory)
                freed += freed_here
            except HypemanError as exc:
                log.warning("gc: skipping %s: %s", directory, exc)
        if records is None:
            removed_dirs += 1
            continue
        keep |= {d for r in records for d in blobs_needed(r)}
    remove_dangling_tags(store.root)
    freed += store.sweep()
    result = blobs.gc(keep)
    # After the blobs: a scan whose blob just went goes too.
    scans_removed, scans_freed = _scan_cache(blobs).gc(blobs)
    return GcReport(
        result.blobs_removed,
        result.bytes_freed + freed + scans_freed,
        removed_dirs,
        scans_removed,
    )


def _scan_cache(blobs: BlobStore) -> ScanCache:
    """The layer scans kept beside ``blobs``; only gc and recovery touch them."""
    # Imported here: list, inspect, rm and tag load this module (through the
    # manager) but never touch the scans, and the scan code is a sizeable
    # import (tests/cli/test_cli_startup.py).
    from hypeman_images.layers.scancache import ScanCache

    return ScanCache.beside(blobs)


def _collect_build_dir(store: ImageStore, directory: Path) -> tuple[int, list[ImageRecord] | None]:
    """gc of one build dir, if idle: removed when every record in it is abandoned, else
    the abandoned disks' files and the leftovers go. Bytes freed, and the records
    left (None: the directory is gone)."""
    with idle_lock(directory) as free:
        records = read_records(directory)  # again, under the lock
        if not free:
            return 0, records
        if all(abandoned(r) for r in records):
            return store.remove_directory(directory), None
        freed = _drop_abandoned_disks(store, directory, records)
        freed += sweep_build_dir(directory, store.quarantine)
        return freed, [r for r in records if not abandoned(r)]


def _drop_abandoned_disks(store: ImageStore, directory: Path, records: list[ImageRecord]) -> int:
    """Remove the disk and record of each format without a good record; bytes freed."""
    good = {r.format for r in records if not abandoned(r)}
    freed = 0
    for fmt in DiskFormat:
        if fmt not in good:
            for name in (fmt.disk_name, fmt.metadata_name):
                label = f"{directory.parent.name}/{directory.name}/{name}"
                freed += discard(directory / name, store.quarantine, label)
    return freed


def recover_builds(
    store: ImageStore,
    blobs: BlobStore,
    options: BuildOptions,
    submit: Callable[[Job], object],
) -> RecoveryReport:
    """Queue again (``submit``) the builds a crash interrupted; restore missing tag links.

    Records in pending/pulling/converting whose build lock nobody holds are
    queued again from their name and digest, with the free space first asked
    for (the manifest is fetched again by digest, which gives the same build);
    a ready record whose tag link is missing gets it; temp files and
    half-deleted dirs of dead writers go. Unreadable records are quarantined,
    and a record that fails to recover is logged and tried again at the next
    start: one record must not keep the service from starting
    (docs/security.md, "Deep trees and leftovers"). A build asked for with
    borrowed credentials cannot be resumed without them: it is marked failed.
    """
    resumed: list[str] = []
    retagged: list[str] = []
    freed = store.sweep() + blobs.sweep_ingest()
    freed += _scan_cache(blobs).sweep()
    quarantine_unreadable(store)
    for stored in sorted(store.scan(), key=lambda s: s.record.created_at):
        try:
            freed += _recover_one(store, stored, options, submit, resumed, retagged)
        except (HypemanError, OSError) as exc:
            log.warning("cannot recover %s: %s", stored.directory, exc)
    return RecoveryReport(tuple(resumed), tuple(retagged), freed)


def _recover_one(
    store: ImageStore,
    stored: StoredImage,
    options: BuildOptions,
    submit: Callable[[Job], object],
    resumed: MutableSequence[str],
    retagged: MutableSequence[str],
) -> int:
    """Recover one record (see :func:`recover_builds`); returns the bytes of leftovers freed."""
    record = stored.record
    with idle_lock(stored.directory) as free:
        if not free:
            return 0
        freed = sweep_build_dir(stored.directory, store.quarantine)
    try:
        ref = parse_reference(record.name)
        digest = Digest.parse(record.digest)
    except HypemanError as exc:
        log.warning("cannot recover %s: %s", stored.directory, exc)
        return freed
    if ref.name != stored.repository or digest.encoded != stored.directory.name:
        log.warning("ignoring %s: its record names %s", stored.directory, record.name)
        return freed
    names = [ref, *pending_tags(record, ref)]
    broken = record.status is ImageStatus.READY and not stored.disk.is_file()
    if record.status.active and record.borrowed_credentials:
        # Its credentials lived in the request's memory only (build.request), and
        # the server's may not do: the asker has to ask again, with credentials.
        store.write(ref, digest, record.evolve(status=ImageStatus.FAILED, error=_BORROWED))
    elif record.status.active or broken:
        # Rebuild as first asked: the free space changes the disk's bytes.
        asked = replace(options, format=record.format)
        if record.free_space_bytes is not None:
            asked = replace(asked, free_space=record.free_space_bytes)
        job = Job(BuildKey(ref.name, digest, record.format), ref.with_digest(digest), asked)
        for name in names[1:]:
            job.add_name(name)  # every tag that asked, not only the first
        job.recovered = True
        submit(job)
        store.update(ref, digest, lambda r: r.evolve(), record.format)  # ours now (its writer)
        resumed.append(record.name)
    elif record.status is ImageStatus.READY:
        # The crash fell between "ready" and the tag links. A link that
        # exists was moved on purpose since, and stays.
        for name in names:
            if name.tag is not None and store.tag_target(name) is None:
                store.set_tag(name, digest)
                retagged.append(str(name))
        store.update(ref, digest, without_pending_tags, record.format)
    return freed


def verify_image(
    store: ImageStore, ref: Reference, stored: StoredImage, mke2fs: str, *, record: bool
) -> Verified:
    """Check the ready disk of ``stored`` (found for ``ref``) again; see ``ImageManager.verify``."""
    # Imported here: only this call needs the disk code.
    from hypeman_images.disk.e2fsprogs import find_e2fsprogs
    from hypeman_images.disk.verify import Verified, check_disk, check_erofs_disk

    def ready(record: ImageRecord | None) -> ImageRecord:
        if record is None or record.status is not ImageStatus.READY:
            status = record.status if record is not None else "gone"
            raise Conflict(f"{ref.familiar()} is {status}, not ready: nothing to verify yet")
        return record

    # Checked before the build lock too: a build in progress holds it for minutes.
    digest, fmt = Digest.parse(ready(stored.record).digest), stored.record.format
    key = parse_reference(f"{stored.repository}@{digest}")
    tools = find_e2fsprogs(mke2fs) if fmt is DiskFormat.EXT4 else None
    with store.lock(key, digest):
        current = ready(store.read(key, digest, fmt))
        disk = store.digest_dir(key, digest) / fmt.disk_name
        if tools is not None:
            sha256 = str(check_disk(tools, disk, current.disk_sha256))
        else:
            sha256 = str(check_erofs_disk(disk, current.disk_sha256))
        recorded_now = record and current.disk_sha256 is None
        if recorded_now:
            store.update(key, digest, lambda r: r.evolve(disk_sha256=sha256), fmt)
    return Verified(
        str(ref),
        str(digest),
        disk,
        sha256,
        current.disk_sha256,
        recorded_now=recorded_now,
        format=str(fmt),
    )
