"""The one seam the CLI and the API use: create, list, get, delete, gc, recover.

:class:`ImageManager` owns a data dir (image store + blob cache), the registry
client and a :class:`~hypeman_images.build.queue.BuildQueue`. ``create`` resolves
the name to a digest with one manifest GET (concurrent requests for the same
name share it), then joins the build already queued for that digest or queues
a new one, and returns at once. ``pull`` is ``create`` plus waiting.

Deleting an image whose build is queued or running is refused with
:class:`~hypeman_images.errors.Conflict` (HTTP 409): cancelling would need
every stage (download threads, mke2fs) to stop cooperatively, and a refusal
is simple to reason about. Wait for the build to end, then delete.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from hypeman_images.build.diskpush import DiskPushes
from hypeman_images.build.image import Image, image_of, image_view
from hypeman_images.build.maintenance import (
    GcReport,
    RecoveryReport,
    collect_garbage,
    recover_builds,
    verify_image,
)
from hypeman_images.build.metrics import Metrics, QueueGauges
from hypeman_images.build.options import BuildOptions, DataDir
from hypeman_images.build.pipeline import BuildStats, build_resolved, initial_record
from hypeman_images.build.progress import Reporter
from hypeman_images.build.pull import ResolvedImage
from hypeman_images.build.queue import BuildKey, BuildQueue, Job, PauseHook, PausingReporter
from hypeman_images.build.records import (
    find_image,
    ready_image,
    record_failure,
    remember_tag,
    without_pending_tags,
    write_pending,
)
from hypeman_images.build.resolving import SharedResolver
from hypeman_images.errors import Conflict, HypemanError, InvalidArgument
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.reference import Reference, parse_reference
from hypeman_images.registry.client import RegistryClient
from hypeman_images.store.access import prepare_data_dir
from hypeman_images.store.blobs import BlobStore
from hypeman_images.store.formats import DiskFormat
from hypeman_images.store.housekeeping import idle_lock, settled
from hypeman_images.store.images import ImageRecord, ImageStatus, ImageStore, StoredImage

if TYPE_CHECKING:
    from hypeman_images.disk.verify import Verified
    from hypeman_images.fleet.push import PushedDisk

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 2


class Builder(Protocol):
    """The shape of :func:`pipeline.build_resolved`: a seam for tests to observe builds."""

    def __call__(
        self,
        resolved: ResolvedImage,
        *,
        client: RegistryClient,
        blobs: BlobStore,
        store: ImageStore,
        options: BuildOptions,
        reporter: Reporter,
        on_status: Callable[[Reference, ImageRecord], None] | None,
        stats: BuildStats,
    ) -> StoredImage: ...


class ImageManager:
    """Images in one data dir, built by a queue of at most ``concurrency`` builds.

    ``client_factory`` makes the registry client (tests pass their own); it is
    called once, on first use. ``builder`` is the pipeline (a seam for tests).
    ``pause`` is the crash-test hook of :mod:`hypeman_images.build.queue`.
    The data dir is made private, or shared with ``data_dir_group``
    (:func:`~hypeman_images.store.access.prepare_data_dir`).
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        options: BuildOptions | None = None,
        client_factory: Callable[[], RegistryClient] = RegistryClient,
        concurrency: int = DEFAULT_CONCURRENCY,
        builder: Builder = build_resolved,
        pause: PauseHook | None = None,
        data_dir_group: int | None = None,
    ) -> None:
        self.data = DataDir(data_dir)
        prepare_data_dir(self.data.root, data_dir_group)
        self.options = options or BuildOptions()
        self._pause = pause or PauseHook()
        self.store = ImageStore(self.data.images, on_temp_written=self._metadata_written)
        self.blobs = BlobStore(self.data.cache)
        self.metrics = Metrics()
        self._client_factory = client_factory
        self._client: RegistryClient | None = None
        self._builder = builder
        # Guards the job table against create/delete/gc interleaving; always taken
        # before the queue's own lock, never after it.
        self._lock = threading.RLock()
        # The digest each tag was last resolved to here: a slow build of an older
        # digest must not move a tag back after a newer one was asked for.
        self._latest: dict[str, Digest] = {}
        self._resolver = SharedResolver(lambda: self.client, self._pause)
        self._queue = BuildQueue(self._run, concurrency)
        # Disks built here go to the disk cache off the queue: ready is not delayed.
        self._pushes = DiskPushes(lambda: self.client, self.blobs, self.metrics)

    @property
    def client(self) -> RegistryClient:
        """The registry client, made on first use."""
        with self._lock:
            if self._client is None:
                self._client = self._client_factory()
            return self._client

    def close(self, timeout: float | None = None) -> None:
        """Stop starting builds; wait up to ``timeout`` for running ones; release connections.

        Builds still running after ``timeout`` die with the process and are
        resumed by the next :meth:`recover`; so do pushes to the disk cache, which
        are waited for as long again (an unfinished push leaves nothing visible).
        """
        if self._queue.close(timeout) and self._pushes.drain(timeout):
            with self._lock:
                if self._client is not None:
                    self._client.close()
                    self._client = None
        else:
            log.warning("builds still running at shutdown; they resume at the next start")

    def __enter__(self) -> ImageManager:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        # Unwinding an error (Ctrl-C included): don't wait for builds to finish.
        self.close(timeout=0 if kind is not None else None)

    # -- requests ---------------------------------------------------------------

    def create(
        self,
        name: str | Reference,
        *,
        options: BuildOptions | None = None,
        format: DiskFormat | None = None,
    ) -> Image:
        """Ask for ``name`` to be built; return at once (pending, or ready if already built).

        The name is resolved to its digest first (one manifest GET); unknown
        names raise :class:`NotFound` here rather than failing later.
        ``format`` overrides the options' disk format.
        """
        ref = _parse(name)
        options = options or self.options
        if format is not None:
            options = replace(options, format=format)
        image, _ = self._submit(ref, options, None, None)
        return image

    def pull(
        self,
        name: str | Reference,
        *,
        options: BuildOptions | None = None,
        reporter: Reporter | None = None,
        stats: BuildStats | None = None,
    ) -> StoredImage:
        """Build ``name`` through the queue and wait; return the ready image or raise."""
        ref = _parse(name)
        options = options or self.options
        reporter = reporter or Reporter()
        stats = stats if stats is not None else BuildStats()
        reporter.stage("resolving", ref.familiar())
        image, job = self._submit(ref, options, reporter, stats)
        if job is None:
            reporter.stage("ready", f"{ref.familiar()} (already built)")
            return self.store.find(ref.with_digest(Digest.parse(image.digest)), options.format)
        job.wait()
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def wait(self, name: str | Reference, timeout: float | None = None) -> Image:
        """Block until the build ``name`` names ends (or ``timeout``); return its image."""
        ref = _parse(name)
        with self._lock:
            job = self._job_for(ref)
        if job is not None:
            job.wait(timeout)
        return self.get(ref)

    def get(self, name: str | Reference, *, format: DiskFormat | None = None) -> Image:
        """The image ``name`` names (tag or digest), building or built; NotFound otherwise.

        By tag, a build in progress for that tag wins over the ready digest the
        tag still points at: it is what the asker is waiting for. ``format``
        picks that disk's record; without it, a digest with both disks shows
        its ready one (ext4 first).
        """
        ref = _parse(name)
        with self._lock:
            job = self._job_for(ref, format)
            if job is not None:
                return self._job_image(job, str(ref))
        return self._stored_image(find_image(self.store, ref, format), str(ref))

    def delete(self, name: str | Reference) -> list[str]:
        """Delete by tag (the disk goes with its last tag) or by digest (with all its tags).

        Raises :class:`Conflict` while a build of that name or digest is queued
        or running, :class:`NotFound` for an unknown name. Returns what was removed.
        """
        ref = _parse(name)
        with self._lock:
            job = self._job_for(ref)
            if job is not None:
                raise Conflict(
                    f"{ref.familiar()} is being built ({job.status}); "
                    "wait until it is ready or failed, then delete it"
                )
            stored = find_image(self.store, ref)
            with idle_lock(stored.directory) as free:
                if not free:
                    raise Conflict(
                        f"{ref.familiar()} is being built by another process; try again later"
                    )
                if stored.tags or ref.digest is not None:
                    removed = self.store.remove(ref)
                else:  # a failed or interrupted build has no tag link to go through
                    self.store.remove_directory(stored.directory)
                    removed = [f"{stored.repository}@{stored.record.digest}"]
            self.blobs.untag(set(removed))
            return removed

    def verify(
        self, name: str | Reference, *, record: bool = False, format: DiskFormat | None = None
    ) -> Verified:
        """Check the ready disk ``name`` names again: ``e2fsck -fn`` and its sha256.

        Raises :class:`CorruptDisk` when e2fsck finds a problem or the disk no
        longer hashes to the sha256 recorded when it was built; with ``record``,
        a disk built with ``--no-disk-digest`` gets its sha256 recorded now.
        The digest's build lock is held throughout, so no build or delete of
        it runs meanwhile. ``format`` picks the disk, as for :meth:`get`; an
        EROFS disk is checked with ``fsck.erofs`` (erofs-utils) instead.
        """
        ref = _parse(name)
        mke2fs = self.options.mke2fs or "mke2fs"
        stored = find_image(self.store, ref, format)
        return verify_image(self.store, ref, stored, mke2fs, record=record)

    def push_disk(self, name: str | Reference) -> PushedDisk:
        """Push the ready disk ``name`` names to the disk cache the options name, now.

        Raises :class:`InvalidArgument` without a disk cache, and the
        registry's errors (:class:`Unauthorized` without push rights, ...).
        """
        cache = self.options.disk_cache
        if cache is None:
            raise InvalidArgument("no disk cache to push to: name one with --disk-cache")
        stored = find_image(self.store, _parse(name), DiskFormat.EXT4)  # the cache's format
        return self._pushes.push(cache, stored)

    def list(self) -> list[Image]:
        """Every image in the store and in the queue, by repository and age."""
        jobs = {job.key: job for job in self._queue.jobs()}
        images: list[Image] = []
        for stored in self.store.scan():
            key = _key_of(stored)
            job = jobs.pop(key, None) if key is not None else None
            images.append(self._job_image(job) if job else self._stored_image(stored))
        images.extend(self._job_image(job) for job in jobs.values())
        return sorted(images, key=lambda i: (i.repository, i.created_at, i.digest))

    def gc(self) -> GcReport:
        """Remove what no image needs: failed or unreadable build dirs, their blobs, leftovers.

        Blobs of ready and of queued, running or interrupted builds are kept.
        """
        with self._lock:
            active = {job.key for job in self._queue.jobs()}
            return collect_garbage(self.store, self.blobs, active)

    def recover(self) -> RecoveryReport:
        """Resume builds a crash interrupted and clean what it left; call once at start.

        Records in pending/pulling/converting whose build lock nobody holds
        are queued again from their name and digest (the manifest is fetched
        again by digest, which gives the same build); a ready record whose tag
        link is missing gets it; temp files and half-deleted dirs of dead
        writers go. A build another live process holds is left to it.
        """
        with self._lock:
            report = recover_builds(self.store, self.blobs, self.options, self._queue.submit)
        if report.resumed or report.retagged:
            log.info(
                "recovery: resumed %s; retagged %s", list(report.resumed), list(report.retagged)
            )
        return report

    def gauges(self) -> QueueGauges:
        """Queue length and running builds, for metrics."""
        waiting, running = self._queue.counts()
        return QueueGauges(waiting, running)

    # -- internals --------------------------------------------------------------

    def _submit(
        self,
        ref: Reference,
        options: BuildOptions,
        reporter: Reporter | None,
        stats: BuildStats | None,
    ) -> tuple[Image, Job | None]:
        """Join or queue the build ``ref`` resolves to; ``None`` job when already built."""
        self.store.validate(ref)
        if ref.digest is not None:
            # A digest-pinned name whose disk is ready needs no network at all.
            found = self.store.locate(ref, ref.digest)
            ready = ready_image(self.store, ref, found, options.format)
            if ready is not None:
                self._reused(stats)
                return self._stored_image(ready, str(ref)), None
        resolved = self._resolver.resolve(ref, options.platform)
        digest = resolved.digest
        key = BuildKey(ref.name, digest, options.format)
        with self._lock:
            if ref.tag is not None:
                self._latest[str(ref.with_tag(ref.tag))] = digest
            job = self._queue.get(key)
            if job is not None:
                job.add_name(resolved.ref)
                remember_tag(self.store, job, resolved.ref)
                if reporter is not None:
                    job.reporter.attach(reporter)
                return self._job_image(job, str(ref)), job
            ready = ready_image(self.store, ref, digest, options.format)
            if ready is not None:
                self.store.set_tag(resolved.ref, digest)
                self._reused(stats)
                stored = self.store.find(resolved.ref, options.format)
                return self._stored_image(stored, str(ref)), None
            write_pending(self.store, resolved, options)
            job = Job(key, resolved.ref, options, resolved=resolved, stats=stats)
            if reporter is not None:
                job.reporter.attach(reporter)
            self._queue.submit(job)
            return self._job_image(job, str(ref)), job

    def _reused(self, stats: BuildStats | None) -> None:
        self.metrics.image_reused()
        if stats is not None:
            stats.reused = True

    def _run(self, job: Job) -> None:
        """A queue worker's body: build ``job`` and set every tag that asked for it."""
        self.metrics.build_started()
        started = time.monotonic()
        ok = False

        def on_status(ref: Reference, record: ImageRecord) -> None:
            if record.status is ImageStatus.READY:
                # Shown as ready only below, once every tag that asked points at it.
                self._pause.reached("tagging")
                return
            job.update(record)

        # A recovered build leaves alone a tag link that was moved meanwhile.
        before = {str(n): self.store.tag_target(n) for n in job.names} if job.recovered else {}
        try:
            resolved = job.resolved or self._resolver.again(job)
            job.result = self._builder(
                resolved,
                client=self.client,
                blobs=self.blobs,
                store=self.store,
                options=job.options,
                reporter=PausingReporter(job.reporter, self._pause),
                on_status=on_status,
                stats=job.stats,
            )
            ok = True
        except HypemanError as exc:
            record_failure(self.store, job, exc)
            raise
        finally:
            if job.stats.reused:
                self.metrics.image_reused()
            stats = job.stats
            self.metrics.disk_cache_used(
                stats.disk_cache, stats.disk_cache_reason, stats.fetched_bytes
            )
            self.metrics.build_finished(
                "success" if ok else "failure",
                time.monotonic() - started,
                job.stats.downloaded_bytes,
                job.stats.cached_blobs,
            )
            with self._lock:
                if ok:
                    for name in job.names:
                        target = self._tag_target(name, job.key.digest, before.get(str(name)))
                        if target is not None:
                            self.store.set_tag(name, target)
                    key = job.key
                    self.store.update(job.ref, key.digest, without_pending_tags, key.format)
                    job.result = self.store.find(job.ref, key.format)
                    job.update(job.result.record)
                    self._pushes.built(job)
                self._queue.retire(job)

    def _metadata_written(self, record: ImageRecord) -> None:
        """The store wrote a record's temp file: the crash tests' "metadata" stage."""
        if record.status is ImageStatus.READY:
            self._pause.reached("metadata")

    def _tag_target(self, name: Reference, built: Digest, before: Digest | None) -> Digest | None:
        """Where tag ``name`` should point once ``built`` is ready (None: leave it).

        The newest request for a tag wins over a build that merely finished later;
        a recovered build keeps a link that was moved to another digest meanwhile.
        """
        if before is not None and before != built:
            return before
        wanted = self._latest.get(str(name), built)
        if wanted == built:
            return built
        return wanted if ready_image(self.store, name, wanted, None) is not None else None

    def _job_for(self, ref: Reference, fmt: DiskFormat | None = None) -> Job | None:
        found = [j for j in self._queue.jobs() if j.answers(ref) and fmt in (None, j.key.format)]
        return found[-1] if found else None

    def _job_image(self, job: Job, name: str | None = None) -> Image:
        record = (
            job.record
            or self.store.read(job.ref, job.key.digest, job.key.format)
            or initial_record(job.ref, job.key.digest, job.status, job.key.format)
        )
        if job.status is ImageStatus.FAILED and record.status is not ImageStatus.FAILED:
            record = record.evolve(status=ImageStatus.FAILED, error=str(job.error))
        directory = self.store.digest_dir(job.ref, job.key.digest)
        return image_view(
            record,
            job.key.repository,
            (),
            directory,
            name=name,
            status=job.status,
            queue_position=self._queue.position(job),
        )

    def _stored_image(self, stored: StoredImage, name: str | None = None) -> Image:
        return image_of(settled(stored), name)


def _parse(name: str | Reference) -> Reference:
    return parse_reference(name) if isinstance(name, str) else name


def _key_of(stored: StoredImage) -> BuildKey | None:
    try:
        digest = Digest.parse(stored.record.digest)
        return BuildKey(stored.repository, digest, stored.record.format)
    except HypemanError:
        return None


__all__ = [
    "DEFAULT_CONCURRENCY",
    "Builder",
    "Image",
    "ImageManager",
]
