"""The one seam the CLI and the API use: create, list, get, tag, delete, gc, recover.

:class:`ImageManager` owns a data dir (image store + blob cache), the registry
client and a :class:`~hypeman_images.build.queue.BuildQueue`. ``create`` resolves
the name to a digest with one manifest GET (concurrent requests for the same
name share it), then joins the build already queued for that digest or queues
a new one, and returns at once. ``pull`` is ``create`` plus waiting. Deleting
an image whose build is queued or running is a
:class:`~hypeman_images.errors.Conflict` (HTTP 409): cancelling would need every
stage (downloads, mke2fs) to stop cooperatively; a refusal is simple to reason about.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from hypeman_images.build.diskpush import DiskPushes
from hypeman_images.build.image import Image, image_of, image_view
from hypeman_images.build.lookup import local_reference
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
from hypeman_images.build.queue import DEFAULT_CONCURRENCY, BuildKey, BuildQueue, Job, PauseHook
from hypeman_images.build.records import find_image, join_build, ready_image, relabel, write_pending
from hypeman_images.build.request import ImageRequest, image_request, labels_match
from hypeman_images.build.resolving import SharedResolver
from hypeman_images.build.tagging import tag_image
from hypeman_images.build.worker import Builder, BuildWorker
from hypeman_images.errors import Conflict, HypemanError, InvalidArgument
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.reference import Reference, parse_reference
from hypeman_images.oci.spec import Platform
from hypeman_images.store.access import prepare_data_dir
from hypeman_images.store.blobs import BlobStore
from hypeman_images.store.formats import DiskFormat
from hypeman_images.store.housekeeping import idle_lock, settled
from hypeman_images.store.images import ImageRecord, ImageStatus, ImageStore, StoredImage

if TYPE_CHECKING:
    from hypeman_images.disk.verify import Verified
    from hypeman_images.fleet.push import PushedDisk
    from hypeman_images.registry.client import RegistryClient
    from hypeman_images.registry.credentials import Credential

log = logging.getLogger(__name__)


def _default_client() -> RegistryClient:
    # Imported when first made: it brings httpx, which the commands that only read
    # the store never need (list, inspect, rm, tag; tests/cli/test_cli_startup.py).
    from hypeman_images.registry.client import RegistryClient

    return RegistryClient()


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
        client_factory: Callable[[], RegistryClient] = _default_client,
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
        # Guards the job table against create/delete/gc interleaving; always taken
        # before the queue's own lock, never after it.
        self._lock = threading.RLock()
        # The digest each tag was last resolved to here: a slow build of an older
        # digest must not move a tag back after a newer one was asked for.
        self._latest: dict[str, Digest] = {}
        self._resolver = SharedResolver(lambda: self.client, self._pause)
        # Disks built here go to the disk cache off the queue: ready is not delayed.
        self._pushes = DiskPushes(lambda: self.client, self.blobs, self.metrics)
        worker = BuildWorker(
            store=self.store,
            blobs=self.blobs,
            metrics=self.metrics,
            pause=self._pause,
            builder=builder,
            client=lambda: self.client,
            again=self._resolver.again,
            lock=self._lock,
            latest=self._latest,
            built=self._pushes.built,
            retire=lambda job: self._queue.retire(job),
        )
        self._queue = BuildQueue(worker.run, concurrency)

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
        platform: Platform | str | None = None,
        labels: Mapping[str, str] | None = None,
        credentials: Credential | None = None,
    ) -> Image:
        """Ask for ``name`` to be built; return at once (pending, or ready if already built).

        The name is resolved to its digest first (one manifest GET); unknown names
        raise :class:`NotFound` here. ``format`` and ``platform`` (a :class:`Platform`,
        or text as ``docker --platform`` takes it) override the options'; ``labels``
        replace the image's (hypeman's ``tags``); ``credentials`` are borrowed for this
        pull only (:mod:`.request`): a build in flight with others is a :class:`Conflict`.
        """
        ref = _parse(name)
        options = options or self.options
        if format is not None:
            options = replace(options, format=format)
        request = image_request(options, platform=platform, labels=labels, credentials=credentials)
        image, _ = self._submit(ref, request, None, None)
        return image

    def pull(
        self,
        name: str | Reference,
        *,
        options: BuildOptions | None = None,
        platform: Platform | str | None = None,
        labels: Mapping[str, str] | None = None,
        credentials: Credential | None = None,
        reporter: Reporter | None = None,
        stats: BuildStats | None = None,
    ) -> StoredImage:
        """Build ``name`` through the queue and wait; return the ready image or raise.

        Takes what :meth:`create` takes.
        """
        ref = _parse(name)
        request = image_request(
            options or self.options, platform=platform, labels=labels, credentials=credentials
        )
        fmt = request.options.format
        reporter = reporter or Reporter()
        stats = stats if stats is not None else BuildStats()
        reporter.stage("resolving", ref.familiar())
        image, job = self._submit(ref, request, reporter, stats)
        if job is None:
            reporter.stage("ready", f"{ref.familiar()} (already built)")
            return self.store.find(ref.with_digest(Digest.parse(image.digest)), fmt)
        job.wait()
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def wait(self, name: str | Reference, timeout: float | None = None) -> Image:
        """Block until the build ``name`` names ends (or ``timeout``); return its image."""
        ref = self._find(name)
        with self._lock:
            job = self._job_for(ref)
        if job is not None:
            job.wait(timeout)
        return self.get(ref)

    def get(self, name: str | Reference, *, format: DiskFormat | None = None) -> Image:
        """The image ``name`` names, building or built; NotFound otherwise.

        ``name`` is a tag or digest reference, or an image ID (``sha256:HEX``,
        or 12 or more hex digits that start one image's digest; :mod:`.lookup`).
        By tag, a build in progress for that tag wins over the ready digest the
        tag still points at: it is what the asker is waiting for. ``format``
        picks that disk's record; without it, a digest with both disks shows
        its ready one (ext4 first).
        """
        ref = self._find(name)
        with self._lock:
            job = self._job_for(ref, format)
            if job is not None:
                return self._job_image(job, str(ref))
        return self._stored_image(find_image(self.store, ref, format), str(ref))

    def delete(self, name: str | Reference) -> list[str]:
        """Delete by tag (the disk goes with its last tag) or by digest (with all its tags).

        Raises :class:`Conflict` while a build of that name or digest is queued
        or running, :class:`NotFound` for an unknown name. Returns what was removed.
        An image ID names a digest, so it removes every tag of it.
        """
        ref = self._find(name)
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
        ref = self._find(name)
        mke2fs = self.options.mke2fs or "mke2fs"
        stored = find_image(self.store, ref, format)
        return verify_image(self.store, ref, stored, mke2fs, record=record)

    def push_disk(self, name: str | Reference, format: DiskFormat | None = None) -> PushedDisk:
        """Push the ready disk ``name`` names to the disk cache the options name, now.

        ``format`` picks the disk, as for :meth:`get` (``None``: the ready one,
        ext4 first). Raises :class:`InvalidArgument` without a disk cache, and
        the registry's errors (:class:`Unauthorized` without push rights, ...).
        """
        cache = self.options.disk_cache
        if cache is None:
            raise InvalidArgument("no disk cache to push to: name one with --disk-cache")
        stored = find_image(self.store, self._find(name), format)
        return self._pushes.push(cache, stored)

    def tag(self, source: str | Reference, target: str | Reference) -> Image:
        """Point the local tag ``target`` at the ready image ``source`` names; no pull.

        ``source`` is named as for :meth:`get`; ``target`` must be a tag
        reference, in any repository (:mod:`.tagging`). :class:`NotFound` if
        ``source`` is unknown, :class:`Conflict` while it is not ready.
        """
        ref, target = self._find(source), _parse(target)
        with self._lock:
            tagged = tag_image(self.store, ref, target, self._job_for, self._queue.get)
            self._latest[str(target)] = Digest.parse(tagged.record.digest)  # the newest word
        return self._stored_image(tagged, str(target))

    def list(self, labels: Mapping[str, str] | None = None) -> list[Image]:
        """Every image in the store and the queue (with every pair of ``labels``), by age."""
        images = [i for i in self._all() if labels_match(i.tags, labels or {})]
        return sorted(images, key=lambda i: (i.repository, i.created_at, i.digest))

    def _all(self) -> Iterator[Image]:
        jobs = {job.key: job for job in self._queue.jobs()}
        for stored in self.store.scan():
            key = _key_of(stored)
            job = jobs.pop(key, None) if key is not None else None
            yield self._job_image(job) if job else self._stored_image(stored)
        yield from (self._job_image(job) for job in jobs.values())

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
        request: ImageRequest,
        reporter: Reporter | None,
        stats: BuildStats | None,
    ) -> tuple[Image, Job | None]:
        """Join or queue the build ``ref`` resolves to; ``None`` job when already built."""
        self.store.validate(ref)
        options, fmt = request.options, request.options.format
        if ref.digest is not None:
            # A digest-pinned name whose disk is ready needs no network at all.
            ready = ready_image(self.store, ref, self.store.locate(ref, ref.digest), fmt)
            if ready is not None:
                relabel(self.store, ref, Digest.parse(ready.record.digest), request.labels, fmt)
                self._reused(stats)
                return self._stored_image(self.store.find(ref, fmt), str(ref)), None
        client = self.client
        if request.credential is not None:
            client = client.borrowing(ref.registry, request.credential)
        if options.disk_cache is not None and options.disk_cache.looks and fmt is DiskFormat.EXT4:
            # The disk cache's lookup names the e2fsprogs release: probed while resolving
            # (imported here: as for the registry client, only a build needs it).
            from hypeman_images.disk.e2fsprogs import TOOLS_FILE, warm_e2fsprogs

            warm_e2fsprogs(options.mke2fs or "mke2fs", remember=self.blobs.root / TOOLS_FILE)
        resolved = self._resolver.resolve(ref, options.platform, client, request.fingerprint)
        digest = resolved.digest
        key = BuildKey(ref.name, digest, fmt)
        with self._lock:
            if ref.tag is not None:
                self._latest[str(ref.with_tag(ref.tag))] = digest
            job = self._queue.get(key)
            if job is not None:
                join_build(self.store, job, resolved.ref, request, reporter)
                return self._job_image(job, str(ref)), job
            ready = ready_image(self.store, ref, digest, fmt)
            if ready is not None:
                self.store.set_tag(resolved.ref, digest)
                relabel(self.store, ref, digest, request.labels, fmt)
                self._reused(stats)
                stored = self.store.find(resolved.ref, fmt)
                return self._stored_image(stored, str(ref)), None
            write_pending(self.store, resolved, request)
            job = Job(key, resolved.ref, options, resolved=resolved, stats=stats,
                      client=client if request.credential is not None else None,
                      fingerprint=request.fingerprint)  # fmt: skip
            if reporter is not None:
                job.reporter.attach(reporter)
            self._queue.submit(job)
            return self._job_image(job, str(ref)), job

    def _reused(self, stats: BuildStats | None) -> None:
        self.metrics.image_reused()
        if stats is not None:
            stats.reused = True

    def _metadata_written(self, record: ImageRecord) -> None:
        """The store wrote a record's temp file: the crash tests' "metadata" stage."""
        if record.status is ImageStatus.READY:
            self._pause.reached("metadata")

    def _find(self, name: str | Reference) -> Reference:
        """The reference ``name`` gives: parsed, or an image ID looked up (:mod:`.lookup`)."""
        return local_reference(self.store, name, lambda ref: self._job_for(ref) is not None)

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
            record = record.evolve(status=ImageStatus.FAILED, error=job.error_detail)
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
