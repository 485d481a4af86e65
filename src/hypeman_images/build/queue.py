"""The build queue: at most N builds at once, first come first served, one per image digest.

The queue knows jobs, not registries. The manager hands it a ``run`` function
(resolve if needed, then :func:`pipeline.build_resolved`), and the queue calls
it on a thread per running build. Builds block on sockets and subprocesses,
which release the GIL, so threads are enough and keep the pipeline synchronous.

A job is keyed by :class:`BuildKey` (repository, platform manifest digest):
however many names or requests lead to one digest, one build runs, and every
tag that asked for it is set when it succeeds. ``queue_position`` is 1-based
among waiting jobs and ``None`` once a job runs (hypeman's convention).

:class:`PauseHook` is a test hook: with ``HYPEMAN_TEST_PAUSE_AT=<stage>`` in
the environment a build blocks forever when it reaches that stage, so a test
can ``kill -9`` the process at a known point and check recovery.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hypeman_images.build.options import BuildOptions
from hypeman_images.build.pipeline import BuildStats
from hypeman_images.build.progress import Reporter
from hypeman_images.errors import HypemanError, InvalidArgument
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.reference import Reference
from hypeman_images.store.formats import DiskFormat
from hypeman_images.store.images import ImageRecord, ImageStatus, StoredImage

if TYPE_CHECKING:
    from hypeman_images.build.pull import ResolvedImage
    from hypeman_images.registry.client import RegistryClient

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 2  # builds at once, unless the manager (serve --concurrency) says otherwise
PAUSE_ENV = "HYPEMAN_TEST_PAUSE_AT"
WAIT_SLICE = 0.25  # seconds a waiting thread sleeps between checks for signals (Job.wait)
# resolving: the manifest GET of a request (or of a recovered build); a new
#   request has written nothing yet and its POST is still unanswered.
# pulling: a layer is half-way into the blob cache's ingest dir.
# flattening: the record says converting; nothing of the disk exists yet.
# mke2fs: mke2fs is writing the temp disk from the tar stream.
# metadata: the disk is in place and the "ready" metadata.json is written to its
#   temp file, not yet renamed over the "converting" one.
# tagging: metadata.json says ready, the tag link is not made yet.
PAUSE_STAGES = ("resolving", "pulling", "flattening", "mke2fs", "metadata", "tagging")


@dataclass(frozen=True)
class BuildKey:
    """What makes two requests the same build: repository, platform manifest digest, format.

    The ext4 and the EROFS disk of one digest are two builds; they take turns
    on the digest's build lock.
    """

    repository: str  # registry/repository, as Reference.name
    digest: Digest
    format: DiskFormat = DiskFormat.EXT4


class FanOutReporter(Reporter):
    """Forwards progress to every reporter attached (each CLI or caller waiting on a job)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._targets: list[Reporter] = []

    def attach(self, reporter: Reporter) -> None:
        """Send later events to ``reporter`` too (earlier ones are not replayed)."""
        with self._lock:
            self._targets.append(reporter)

    def _each(self) -> list[Reporter]:
        with self._lock:
            return list(self._targets)

    def stage(self, stage: str, detail: str = "") -> None:
        for target in self._each():
            target.stage(stage, detail)

    def start(self, digest: Digest, size: int, cached: bool) -> None:
        for target in self._each():
            target.start(digest, size, cached)

    def advance(self, digest: Digest, nbytes: int) -> None:
        for target in self._each():
            target.advance(digest, nbytes)

    def done(self, digest: Digest) -> None:
        for target in self._each():
            target.done(digest)

    def converted(self, nbytes: int, total: int) -> None:
        for target in self._each():
            target.converted(nbytes, total)


class PauseHook:
    """Test hook: block the calling thread forever at one named stage of a build.

    Never set in production; :meth:`from_env` is the one place that reads
    :data:`PAUSE_ENV`. The line it logs tells the test the build is parked.
    """

    def __init__(self, stage: str | None = None) -> None:
        if stage is not None and stage not in PAUSE_STAGES:
            raise InvalidArgument(
                f"{PAUSE_ENV}={stage!r}: expected one of {', '.join(PAUSE_STAGES)}"
            )
        self.stage = stage

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PauseHook:
        """The hook ``HYPEMAN_TEST_PAUSE_AT`` asks for (none when unset or empty)."""
        value = (os.environ if env is None else env).get(PAUSE_ENV) or None
        return cls(value)

    def reached(self, stage: str) -> None:
        """Called as a build passes ``stage``; never returns if that is the pause stage."""
        if stage != self.stage:
            return
        log.warning("test hook %s: paused at %s (pid %d)", PAUSE_ENV, stage, os.getpid())
        threading.Event().wait()


class PausingReporter(Reporter):
    """Maps progress events to :data:`PAUSE_STAGES` for the hook, then forwards them."""

    def __init__(self, inner: Reporter, hook: PauseHook) -> None:
        self._inner = inner
        self._hook = hook

    def stage(self, stage: str, detail: str = "") -> None:
        self._inner.stage(stage, detail)
        if stage == "converting":
            self._hook.reached("flattening")

    def start(self, digest: Digest, size: int, cached: bool) -> None:
        self._inner.start(digest, size, cached)

    def advance(self, digest: Digest, nbytes: int) -> None:
        self._inner.advance(digest, nbytes)
        self._hook.reached("pulling")

    def done(self, digest: Digest) -> None:
        self._inner.done(digest)

    def converted(self, nbytes: int, total: int) -> None:
        self._inner.converted(nbytes, total)
        self._hook.reached("mke2fs")


class Job:
    """One build: what to build, who asked under which names, and how it is going.

    ``ref`` carries the digest and, when a tag was asked for, the tag.
    ``resolved`` is ``None`` for a build recovered after a restart: the worker
    then fetches the manifest again by digest, which gives the same build.
    ``client``: the registry client made for the request's borrowed
    credentials (None: the manager's own), dropped with the job when it ends;
    ``fingerprint`` tells those credentials apart (``request.ImageRequest``).
    """

    def __init__(
        self,
        key: BuildKey,
        ref: Reference,
        options: BuildOptions,
        *,
        resolved: ResolvedImage | None = None,
        stats: BuildStats | None = None,
        client: RegistryClient | None = None,
        fingerprint: bytes = b"",
    ) -> None:
        self.key = key
        self.ref = ref
        self.options = options
        self.resolved = resolved
        self.client = client
        self.fingerprint = fingerprint
        self.stats = stats or BuildStats()
        self.reporter = FanOutReporter()
        self.status = ImageStatus.PENDING
        self.record: ImageRecord | None = None
        self.result: StoredImage | None = None
        self.error: BaseException | None = None
        self.queued_at = time.monotonic()
        self.started_at: float | None = None
        self.done = threading.Event()
        self.recovered = False  # queued by recover() after a restart
        self._names: dict[str, Reference] = {}
        self.add_name(ref)

    def add_name(self, ref: Reference) -> None:
        """Also set ``ref``'s tag when the build succeeds (no-op for digest-only names)."""
        if ref.tag is not None:
            tagged = ref.with_tag(ref.tag)
            self._names.setdefault(str(tagged), tagged)

    @property
    def names(self) -> list[Reference]:
        """The tagged names that asked for this digest, first asker first."""
        return list(self._names.values())

    def answers(self, ref: Reference) -> bool:
        """True if ``ref`` (a tag or a digest) names this build."""
        if ref.digest is not None:
            index = self.resolved.index_digest if self.resolved is not None else None
            return ref.name == self.key.repository and ref.digest in (self.key.digest, index)
        return ref.tag is not None and str(ref.with_tag(ref.tag)) in self._names

    def update(self, record: ImageRecord) -> None:
        """The pipeline wrote ``record``; mirror its status."""
        self.record = record
        self._move(record.status, record.error)

    def fail(self, exc: BaseException) -> None:
        """The build ended with ``exc``."""
        self.error = exc
        self._move(ImageStatus.FAILED, self.error_detail)
        if self.record is not None and self.record.status is not ImageStatus.FAILED:
            self.record = self.record.evolve(status=ImageStatus.FAILED, error=self.error_detail)

    @property
    def error_detail(self) -> str | None:
        """What went wrong, as a record keeps it: without the CLI's advice (errors.py)."""
        exc = self.error
        if exc is None:
            return None
        return exc.detail if isinstance(exc, HypemanError) else f"internal error: {exc!r}"

    def announce(self) -> None:
        """Log that the build was queued (the first of its state changes)."""
        self._log(self.status, None)

    def _move(self, status: ImageStatus, error: str | None) -> None:
        """Take ``status``; each change is one info line (``serve``'s log shows them)."""
        if status is not self.status:
            self.status = status
            self._log(status, error if status is ImageStatus.FAILED else None)

    def _log(self, status: ImageStatus, error: str | None) -> None:
        image = self.ref.pinned()
        fields = {"image": image, "digest": str(self.key.digest), "status": str(status)}
        if error:
            fields["error"] = error
        log.info("build of %s: %s", image, status, extra=fields)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the build ends; False on timeout.

        Waits in slices: the kernel may hand a SIGINT to any thread, and a
        main thread blocked in one untimed wait would never run Python's
        handler, so Ctrl-C would not stop the CLI
        (tests/cli/test_cli_progress.py, the Ctrl-C test).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = WAIT_SLICE if deadline is None else min(WAIT_SLICE, deadline - time.monotonic())
            if self.done.wait(max(0.0, left)):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False


class BuildQueue:
    """Jobs waiting and running, at most ``concurrency`` running. Thread-safe."""

    def __init__(self, run: Callable[[Job], None], concurrency: int = DEFAULT_CONCURRENCY) -> None:
        if concurrency < 1:
            raise InvalidArgument(f"concurrency must be at least 1, not {concurrency}")
        self.concurrency = concurrency
        self._run = run
        self._lock = threading.Lock()
        self._jobs: dict[BuildKey, Job] = {}
        self._pending: deque[Job] = deque()
        self._running: dict[BuildKey, threading.Thread] = {}
        self._closed = False

    def submit(self, job: Job) -> Job:
        """Queue ``job``, or return the job already queued or running for its key."""
        with self._lock:
            existing = self._jobs.get(job.key)
            if existing is not None:
                return existing
            self._jobs[job.key] = job
            self._pending.append(job)
            job.announce()
            self._dispatch()
            return job

    def get(self, key: BuildKey) -> Job | None:
        """The queued or running job for ``key``."""
        with self._lock:
            return self._jobs.get(key)

    def jobs(self) -> list[Job]:
        """Every queued or running job, oldest first."""
        with self._lock:
            return sorted(self._jobs.values(), key=lambda job: job.queued_at)

    def position(self, job: Job) -> int | None:
        """1-based place among waiting jobs; None once running or finished."""
        with self._lock:
            for index, waiting in enumerate(self._pending):
                if waiting is job:
                    return index + 1
            return None

    def counts(self) -> tuple[int, int]:
        """(waiting, running)."""
        with self._lock:
            return len(self._pending), len(self._running)

    def retire(self, job: Job) -> None:
        """Forget a finished job, so the next request for its key starts afresh.

        The manager calls this itself, under its own lock, so that a request
        arriving as a build ends either joins it (and gets its tag set) or sees
        the finished record, never something in between.
        """
        with self._lock:
            if self._jobs.get(job.key) is job:
                del self._jobs[job.key]

    def close(self, timeout: float | None = None) -> bool:
        """Start nothing more; wait up to ``timeout`` for running builds. True if none is left.

        Waiting jobs stay ``pending`` on disk and are resumed by the next
        manager's ``recover()``.
        """
        with self._lock:
            self._closed = True
            threads = list(self._running.values())
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in threads:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            thread.join(left)
        with self._lock:
            return not self._running

    def _dispatch(self) -> None:
        # Called with the lock held.
        while not self._closed and self._pending and len(self._running) < self.concurrency:
            job = self._pending.popleft()
            thread = threading.Thread(
                target=self._work, args=(job,), name=f"build-{job.key.digest.short}", daemon=True
            )
            self._running[job.key] = thread
            job.started_at = time.monotonic()
            thread.start()

    def _work(self, job: Job) -> None:
        try:
            self._run(job)
        except HypemanError as exc:
            job.fail(exc)
        except BaseException as exc:  # a build thread's top level: record, never lose the slot
            log.exception("build of %s crashed", job.ref)
            job.fail(exc)
        finally:
            self.retire(job)
            with self._lock:
                self._running.pop(job.key, None)
                self._dispatch()
            job.done.set()


__all__ = [
    "DEFAULT_CONCURRENCY",
    "PAUSE_ENV",
    "PAUSE_STAGES",
    "BuildKey",
    "BuildQueue",
    "FanOutReporter",
    "Job",
    "PauseHook",
    "PausingReporter",
]
