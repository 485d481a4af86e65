"""A new local tag for a ready image, without pulling it again (``docker tag``).

hypeman's ``POST /images/{name}/tag``. Within the source's repository the
tag link is made (by rename, as every link). A target in another repository
needs the image stored there too, since the store keeps each repository's
builds apart (docs/design.md, "The data dir"): its digest directory is made
with the disk hard-linked (copied when a link cannot be made) and the record
copied under the target's name, then linked. A built disk is never written
again, so the two directory entries can share it, and deleting either one
leaves the other whole.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from hypeman_images.build.queue import BuildKey, Job
from hypeman_images.build.records import find_image
from hypeman_images.errors import Conflict, InvalidReference
from hypeman_images.fsutil import fsync_dir, storage_error, temp_name
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.reference import Reference
from hypeman_images.store.images import ImageStatus, ImageStore, StoredImage


def check_target(target: Reference) -> None:
    """A tag target names a tag, never a digest (hypeman: "a tag reference")."""
    if target.digest is not None or target.tag is None:
        raise InvalidReference(
            f"tag target {target}: must be a tag reference (repository:tag), not a digest"
        )


def not_ready(name: str, status: str) -> Conflict:
    """The error for tagging an image that is not ready (hypeman: 409)."""
    return Conflict(
        f"{name} is {status}, not ready: it can be tagged once it is ready",
        hint="wait for it (hypeman-images pull waits), then tag it",
        api_hint="poll GET /images/{name} until its status is ready, then tag it",
    )


def ready_source(source: StoredImage, name: str) -> Digest:
    """The digest of ``source`` if it is ready; :class:`Conflict` while it is not."""
    record = source.record
    if record.status is not ImageStatus.READY or not source.disk.is_file():
        raise not_ready(name, record.status)
    return Digest.parse(record.digest)


def tag_image(
    store: ImageStore,
    ref: Reference,
    target: Reference,
    job_for: Callable[[Reference], Job | None],
    queued: Callable[[BuildKey], Job | None],
) -> StoredImage:
    """Point ``target``'s tag at the ready image ``ref`` names; return it as ``target``.

    ``job_for`` and ``queued`` find the builds in progress (by name, by key):
    :class:`Conflict` while ``ref``'s is, or while ``target``'s repository
    builds that digest (its own disk will do once it is ready).
    """
    check_target(target)
    store.validate(target)
    job = job_for(ref)
    if job is not None:
        raise not_ready(ref.familiar(), job.status)
    source = find_image(store, ref)
    digest = ready_source(source, ref.familiar())
    fmt = source.record.format
    if queued(BuildKey(target.name, digest, fmt)) is not None:
        raise Conflict(f"{target.name}@{digest} is being built; tag it once that ends")
    _tag(store, source, digest, target)
    return store.find(target, fmt)


def _tag(store: ImageStore, source: StoredImage, digest: Digest, target: Reference) -> None:
    """Point ``target``'s tag at ``source`` (ready); store the image there first if need be."""
    if f"{target.registry}/{target.repository}" != source.repository:
        with store.lock(target, digest):
            fmt = source.record.format
            existing = store.read(target, digest, fmt)
            disk = store.digest_dir(target, digest) / fmt.disk_name
            if existing is not None and existing.status.active:
                raise Conflict(
                    f"{target.name}@{digest} is being built; tag it once that build ends"
                )
            if existing is None or existing.status is not ImageStatus.READY or not disk.is_file():
                _link_disk(source.disk, disk)
                record = source.record.evolve(name=target.pinned(), pending_tags=[])
                store.write(target, digest, record, keep_pending=False)
    store.set_tag(target, digest)


def _link_disk(source: Path, final: Path) -> None:
    """Make ``final`` the same disk as ``source``: a hard link, else a copy; by rename."""
    tmp = temp_name(final)
    try:
        try:
            os.link(source, tmp)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            shutil.copyfile(source, tmp)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise storage_error(exc, f"cannot store the disk at {final}") from exc


__all__ = ["check_target", "not_ready", "ready_source", "tag_image"]
