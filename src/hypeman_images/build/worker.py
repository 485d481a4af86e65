"""The body of a build queue's worker: build one job, then set every tag that asked for it.

:class:`~hypeman_images.build.manager.ImageManager` owns the state the worker
shares with requests (its lock, and the digest each tag was last asked for)
and hands it over; the worker runs the pipeline (:class:`Builder`, a seam for
tests), records failures, counts metrics and moves the tag links under that
lock, so that a request sees a build either running or finished and tagged.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from hypeman_images.build.metrics import Metrics
from hypeman_images.build.options import BuildOptions
from hypeman_images.build.pipeline import BuildStats
from hypeman_images.build.progress import Reporter
from hypeman_images.build.queue import Job, PauseHook, PausingReporter
from hypeman_images.build.records import ready_image, record_failure, without_pending_tags
from hypeman_images.errors import HypemanError
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.reference import Reference
from hypeman_images.store.blobs import BlobStore
from hypeman_images.store.images import ImageRecord, ImageStatus, ImageStore, StoredImage

if TYPE_CHECKING:
    from hypeman_images.build.pull import ResolvedImage
    from hypeman_images.registry.client import RegistryClient


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


class BuildWorker:
    """Runs jobs for one manager (module docstring).

    ``client`` gives the manager's registry client (made on first use);
    a job with borrowed credentials brings its own. ``again`` fetches a
    recovered build's manifest again (``resolving.SharedResolver.again``). ``latest`` maps each tag
    to the digest last asked for under it; ``built`` hears of each success,
    tagged (the disk cache's pushes); ``retire`` forgets a finished job.
    """

    def __init__(
        self,
        *,
        store: ImageStore,
        blobs: BlobStore,
        metrics: Metrics,
        pause: PauseHook,
        builder: Builder,
        client: Callable[[], RegistryClient],
        again: Callable[[Job], ResolvedImage],
        lock: threading.RLock,
        latest: dict[str, Digest],
        built: Callable[[Job], None],
        retire: Callable[[Job], None],
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.metrics = metrics
        self._pause = pause
        self._builder = builder
        self._client = client
        self._again = again
        self._lock = lock
        self._latest = latest
        self._built = built
        self._retire = retire

    def run(self, job: Job) -> None:
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
            resolved = job.resolved or self._again(job)
            job.result = self._builder(
                resolved,
                client=job.client or self._client(),
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
                    self._built(job)
                self._retire(job)
                job.client = None  # borrowed credentials go with their build

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


__all__ = ["BuildWorker", "Builder"]
