"""Disks built here, shared through the disk cache: after a build, in the background, or by hand.

After a build that made its disk here (not one fetched from the cache, not a
re-tag of a ready digest, not one whose lookup found the cache refusing or
down), :meth:`DiskPushes.built` queues its push on a small
executor of its own beside the build queue: the image is ``ready`` before the
push starts, and a push that fails (no push rights, a full registry) is one
warning and a metric, never a failed image. :meth:`DiskPushes.drain` waits for
them when the manager closes. ``disk push`` pushes a ready disk by hand
(:meth:`DiskPushes.push`), raising what went wrong.

The disk is pushed under the recipe its record says it was made by
(:func:`diskcache.recorded_recipe`) and checked against the sha256 recorded
when it was built (a disk that changed since is never shared).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

from hypeman_images.build.metrics import Metrics
from hypeman_images.build.queue import Job
from hypeman_images.errors import (
    Conflict,
    HypemanError,
    RateLimited,
    RegistryError,
    TransientError,
    Unauthorized,
)
from hypeman_images.fsutil import storage_error
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.reference import parse_reference
from hypeman_images.oci.spec import Descriptor
from hypeman_images.store.blobs import BlobStore
from hypeman_images.store.images import ImageStatus, StoredImage

if TYPE_CHECKING:
    from hypeman_images.fleet.cache import DiskCache
    from hypeman_images.fleet.push import PushedDisk
    from hypeman_images.registry.client import RegistryClient

log = logging.getLogger(__name__)

# One push at a time: it reads the disk once and compresses on two threads
# (fleet.pack), beside builds that want the same cores.
PUSH_WORKERS = 1
# A lookup that failed for these reasons met a cache repository that refuses or
# is down: a push would only fail again. After any other fallback (an artifact
# that failed a check) the push replaces what was wrong with a good disk.
_UNREACHABLE = frozenset(
    cls.code for cls in (Unauthorized, RateLimited, RegistryError, TransientError)
)


class DiskPushes:
    """The pushes of one manager's disks to their disk cache. Thread-safe.

    ``client`` gives the manager's registry client (credentials, TLS and
    mirrors as for image pulls); ``blobs`` is its blob cache, where the
    manifest a disk is attached to usually is.
    """

    def __init__(
        self, client: Callable[[], RegistryClient], blobs: BlobStore, metrics: Metrics
    ) -> None:
        self._client = client
        self._blobs = blobs
        self._metrics = metrics
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: set[Future[None]] = set()
        self._closed = False

    def built(self, job: Job) -> None:
        """Queue the push of ``job``'s disk, if its options push and the build made it here."""
        cache, stored, resolved = job.options.disk_cache, job.result, job.resolved
        if cache is None or not cache.pushes or stored is None or resolved is None:
            return
        stats = job.stats
        if stats.reused or stats.disk_cache == "hit":
            return  # nothing was built: the disk is in the cache already, or was pushed before
        if stats.disk_cache == "fallback" and stats.disk_cache_reason in _UNREACHABLE:
            return
        subject = Descriptor(resolved.media_type, resolved.digest, len(resolved.manifest_bytes))
        with self._lock:
            if self._closed:
                log.info("not pushing %s: closing", stored.record.name)
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(PUSH_WORKERS, thread_name_prefix="disk-push")
            future = self._pool.submit(self._background, cache, stored, subject)
            self._pending.add(future)
        future.add_done_callback(self._forget)

    def push(
        self, cache: DiskCache, stored: StoredImage, subject: Descriptor | None = None
    ) -> PushedDisk:
        """Push ``stored``'s ready disk to ``cache`` now; raises the registry's errors.

        ``subject``: the platform manifest's descriptor, if the caller has it;
        else it is read from the blob cache, or from the image's registry.
        """
        # Imported here: packing needs zstandard, which most commands never load.
        from hypeman_images.build.diskcache import recorded_recipe
        from hypeman_images.fleet.config import Runtime
        from hypeman_images.fleet.push import push_disk

        record = stored.record
        if record.status is not ImageStatus.READY or not stored.disk.is_file():
            raise Conflict(f"{record.name} is {record.status}, not ready: no disk to push yet")
        recipe = recorded_recipe(record)
        expected = Digest.parse(record.disk_sha256) if record.disk_sha256 else None
        try:
            subject = subject or self._subject(stored)
            pushed = push_disk(
                self._client(), cache.repository, stored.disk, subject, recipe,
                Runtime.from_record(record), expected_sha256=expected,
            )  # fmt: skip
        except HypemanError:
            self._metrics.disk_pushed(False, 0)
            raise
        self._metrics.disk_pushed(True, pushed.uploaded_bytes)
        log.info("disk of %s pushed to %s as %s", record.name, cache, pushed.digest.short)
        return pushed

    def drain(self, timeout: float | None = None) -> bool:
        """Take no more pushes; wait up to ``timeout`` for those queued. True if none is left."""
        with self._lock:
            self._closed = True
            pending, pool = list(self._pending), self._pool
        _, left = wait(pending, timeout)
        if pool is not None and not left:
            pool.shutdown(wait=True)
        return not left

    def _background(self, cache: DiskCache, stored: StoredImage, subject: Descriptor) -> None:
        try:
            self.push(cache, stored, subject)
        except HypemanError as exc:  # counted by push(); the image stays ready
            log.warning(
                "disk cache %s: the disk of %s was not pushed: %s", cache, stored.record.name, exc
            )
        except Exception:  # a push thread's top level: a bug is told, never lost in its Future
            self._metrics.disk_pushed(False, 0)
            log.exception("disk cache %s: the push of %s crashed", cache, stored.record.name)

    def _forget(self, future: Future[None]) -> None:
        with self._lock:
            self._pending.discard(future)

    def _subject(self, stored: StoredImage) -> Descriptor:
        """The descriptor of the platform manifest ``stored`` was built from."""
        digest = Digest.parse(stored.record.digest)
        media_type = stored.record.manifest_media_type
        if media_type is not None and self._blobs.has(digest):
            path = self._blobs.path(digest)
            try:
                return Descriptor(media_type, digest, path.stat().st_size)
            except OSError as exc:
                raise storage_error(exc, f"cannot read {path}") from exc
        fetched = self._client().get_manifest(parse_reference(f"{stored.repository}@{digest}"))
        return Descriptor(fetched.media_type, fetched.digest, len(fetched.data))


__all__ = ["PUSH_WORKERS", "DiskPushes"]
