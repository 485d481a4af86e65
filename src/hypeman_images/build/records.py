"""What a build request reads and writes in the image store's records.

A request is written down as a pending record before its build is queued
(:func:`write_pending`), naming its blobs so that gc keeps them, so a crash
before the build starts resumes it; a tag that joins a queued build is noted
in the record too (:func:`remember_tag`, :func:`join_build`), and set once the
build is ready.
A failure before the pipeline wrote anything still ends the record
(:func:`record_failure`). Lookups by name also find failed and interrupted
builds, which have no tag link (:func:`find_image`).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from hypeman_images.build.pipeline import initial_record
from hypeman_images.build.queue import Job
from hypeman_images.build.request import ImageRequest
from hypeman_images.errors import Conflict, HypemanError, NotFound
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.reference import Reference, parse_reference
from hypeman_images.store.formats import DiskFormat
from hypeman_images.store.housekeeping import idle_lock, interrupted
from hypeman_images.store.images import ImageRecord, ImageStatus, ImageStore, StoredImage

if TYPE_CHECKING:
    from hypeman_images.build.progress import Reporter
    from hypeman_images.build.pull import ResolvedImage

log = logging.getLogger(__name__)


def ready_image(
    store: ImageStore, ref: Reference, digest: Digest, fmt: DiskFormat | None = DiskFormat.EXT4
) -> StoredImage | None:
    """The image ``ref`` names at ``digest`` if its ``fmt`` record (any format's, for
    ``None``) is ready and its disk is there."""
    for each in [fmt] if fmt is not None else DiskFormat:
        record = store.read(ref, digest, each)
        if record is None or record.status is not ImageStatus.READY:
            continue
        if (store.digest_dir(ref, digest) / each.disk_name).is_file():
            return store.find(ref.with_digest(digest), each)
    return None


def find_image(store: ImageStore, ref: Reference, fmt: DiskFormat | None = None) -> StoredImage:
    """The stored image by digest or tag link; else the newest record built under that name.

    ``fmt``: the record of that disk format; ``None``: the one a name alone means
    (:func:`~hypeman_images.store.images.preferred`).
    """
    try:
        return store.find(ref, fmt)
    except NotFound:
        if ref.digest is not None:
            raise
        # Failed and interrupted builds have no tag link; their record has the name.
        # (A ready one without its link was untagged on purpose.)
        named = [
            s
            for s in store.scan()
            if s.record.name == str(ref)
            and s.record.status is not ImageStatus.READY
            and fmt in (None, s.record.format)
        ]
        if not named:
            raise
        return max(named, key=lambda s: s.record.updated_at or s.record.created_at)


def write_pending(store: ImageStore, resolved: ResolvedImage, request: ImageRequest) -> None:
    """Record the request on disk first, so a crash before the build starts resumes it.

    Its labels replace the record's (when it gives some); that it borrowed
    credentials is noted, never the credentials.
    """
    options = request.options
    ref, digest, fmt = resolved.ref, resolved.digest, options.format
    existing = store.read(ref, digest, fmt)
    directory = store.digest_dir(ref, digest)
    if existing is not None and existing.status.active and not interrupted(directory, existing):
        return  # another live process's build: the build lock sorts it out
    if ready_image(store, ref, digest, fmt) is not None:
        return  # another process finished it since we looked: never demote a ready build
    fresh = initial_record(ref, digest, ImageStatus.PENDING, fmt)
    record = (
        existing.evolve(status=ImageStatus.PENDING, error=None, name=fresh.name, pending_tags=[])
        if existing is not None
        else fresh
    )
    # Name the blobs now: a gc while the build waits must keep what is cached.
    manifest = resolved.manifest
    record = record.evolve(
        config_digest=str(manifest.config.digest),
        layers=[str(layer.digest) for layer in manifest.layers],
        free_space_bytes=options.free_space,
        index_digest=str(resolved.index_digest) if resolved.index_digest else None,
        tags=request.labels if request.labels is not None else record.tags,
        borrowed_credentials=request.credential is not None,
        platform=str(options.platform),
    )
    store.write(ref, digest, record, keep_pending=False)  # a new round of asking


def relabel(
    store: ImageStore,
    ref: Reference,
    digest: Digest,
    labels: dict[str, str] | None,
    fmt: DiskFormat = DiskFormat.EXT4,
) -> None:
    """Give the ``fmt`` record of ``digest`` the request's labels (None: leave them)."""
    if labels is not None:
        store.update(ref, digest, lambda r: r if r.tags == labels else r.evolve(tags=labels), fmt)


def remember_tag(store: ImageStore, job: Job, ref: Reference) -> None:
    """Note a tag that joined ``job`` in its record, so a crash does not forget it."""
    if ref.tag is None:
        return
    tag = ref.pinned()
    if tag == job.ref.pinned():
        return

    def add(record: ImageRecord) -> ImageRecord:
        if tag == record.name or tag in record.pending_tags:
            return record
        return record.evolve(pending_tags=[*record.pending_tags, tag])

    store.update(job.ref, job.key.digest, add, job.key.format)


def join_build(
    store: ImageStore, job: Job, ref: Reference, request: ImageRequest, reporter: Reporter | None
) -> None:
    """Add a request for ``ref`` (its name, resolved) to the build of its digest.

    The build is queued or running already; the request's tag is noted in its
    record (:func:`remember_tag`), its labels replace the record's, and
    ``reporter`` follows the build. A request made with other credentials
    than the build's is a :class:`Conflict`: it may not see what they fetched.
    """
    if job.fingerprint != request.fingerprint:
        raise Conflict(
            f"{ref.familiar()} is already being pulled with other credentials; "
            "ask again once that build ends"
        )
    job.add_name(ref)
    remember_tag(store, job, ref)
    if request.labels is not None:
        relabel(store, job.ref, job.key.digest, request.labels, job.key.format)
        if job.record is not None:
            job.record = replace(job.record, tags=request.labels)
    if reporter is not None:
        job.reporter.attach(reporter)


def record_failure(store: ImageStore, job: Job, exc: HypemanError) -> None:
    """Failures before the pipeline wrote anything (e.g. re-resolving) still end the record."""
    directory = store.digest_dir(job.ref, job.key.digest)
    record = store.read(job.ref, job.key.digest, job.key.format)
    if record is None or not record.status.active:
        return
    with idle_lock(directory) as free:
        if free:
            failed = record.evolve(status=ImageStatus.FAILED, error=exc.detail)
            store.write(job.ref, job.key.digest, failed)
            job.update(failed)


def pending_tags(record: ImageRecord, ref: Reference) -> list[Reference]:
    """The tags besides ``ref`` that asked for the record's build; odd entries skipped."""
    tags = []
    for text in record.pending_tags:
        try:
            tag = parse_reference(text)
        except HypemanError:
            log.warning("ignoring pending tag %r of %s: not a name", text, record.name)
            continue
        if tag.name == ref.name and tag.tag is not None and tag.digest is None:
            tags.append(tag)
    return tags


def without_pending_tags(record: ImageRecord) -> ImageRecord:
    """``record`` with no tags left waiting for its build (they point at it now)."""
    return record.evolve(pending_tags=[]) if record.pending_tags else record
