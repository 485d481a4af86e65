"""Resolve a reference to one platform's manifest and copy its blobs into the cache.

This is the "registry → blob store" edge of the pipeline. Resolution turns a
normalised reference into a resolved one (digest always present: the platform
manifest's). Blobs already in the cache are not fetched again; the others are
downloaded in parallel, each verified against its digest on the way in.

One :class:`PullObserver` watches a pull: the progress shown, and a
conversion that reads the layers beside it. Its *tap* sees every layer's
compressed bytes while they arrive -- a tee from the download, in its own
thread -- or, for a layer already cached (or downloaded while every tap
worker was busy), reads the cached blob, so that the flattener's first pass
overlaps with the downloads instead of following them. A layer the tap does
not want (its scan is known already) is not tapped at all. Its *feeds* let a
one-pass build read each layer as it lands in the blob cache. Both are
optimisations only: what they make is used after the pull verified every
digest, and if they fail, the caller does that work again from the cache.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO, cast

from hypeman_images.build.observer import PullObserver
from hypeman_images.errors import DigestMismatch, LayerError, LimitExceeded
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.reference import Reference
from hypeman_images.oci.spec import (
    LAYER_COMPRESSION,
    Descriptor,
    ImageConfig,
    Manifest,
    Platform,
    parse_config,
)
from hypeman_images.registry.client import RegistryClient
from hypeman_images.registry.manifests import resolve_manifest
from hypeman_images.store.blobs import BlobStore

log = logging.getLogger(__name__)

DOWNLOAD_WORKERS = 4
# Downloads at once for a build that follows them (``feeds``), which reads the
# layers top first, one after the other: on a link that the downloads fill, four
# at once give the top layer a quarter of it and the build waits for it; the
# fewer at once, the sooner the top layer is whole. Not one: a registry that
# caps each connection would then be four times slower.
FOLLOWED_DOWNLOAD_WORKERS = 2
# Chunks (>= 1 MiB each) a tap may lag behind its download before the download
# waits. Few: with four layers in flight the queues are a large share of the
# peak RSS, and a deeper queue does not make the pull faster.
TAP_QUEUE_CHUNKS = 4
# Taps running at once. A tap is CPU-bound (inflate, sha256, header parsing),
# so more of them than cores only adds buffers (~10 MiB each) and GIL hand-offs,
# and the peak RSS would grow with the number of layers; a layer that finds them
# all busy downloads untapped and is read back from the cache when one frees.
TAP_WORKERS = min(DOWNLOAD_WORKERS, max(2, os.cpu_count() or 2))


class _ChunkPipe(io.RawIOBase):
    """Chunks handed from a download thread to a tap thread, bounded; the tap may leave."""

    def __init__(self) -> None:
        self._queue: queue.Queue[bytes | BaseException | None] = queue.Queue(TAP_QUEUE_CHUNKS)
        self._left = memoryview(b"")
        self._done = False
        self._abandoned = threading.Event()

    # -- the download's side
    def _put(self, item: bytes | BaseException | None) -> None:
        while not self._abandoned.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def tee(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """Yield ``chunks`` unchanged, handing each to the tap too; then end or fail it."""
        try:
            for chunk in chunks:
                self._put(chunk)
                yield chunk
        except BaseException as exc:
            self._put(exc)
            raise
        self._put(None)

    def fail(self, exc: BaseException) -> None:
        """The download failed (or ended unverified): the tap's next read raises."""
        self._put(exc)

    # -- the tap's side
    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._left:
            if self._done:
                return 0
            item = self._queue.get()
            if item is None:
                self._done = True
                return 0
            if isinstance(item, BaseException):
                self._done = True
                raise OSError(f"the download feeding this stream failed: {item!r}")
            self._left = memoryview(item)
        n = min(len(buffer), len(self._left))
        buffer[:n] = self._left[:n]
        self._left = self._left[n:]
        return n

    def close(self) -> None:
        self._abandoned.set()
        super().close()


@dataclass(frozen=True)
class ResolvedImage:
    """A reference pinned to one platform's manifest."""

    ref: Reference
    manifest: Manifest
    manifest_bytes: bytes
    media_type: str
    index_digest: Digest | None = None

    @property
    def digest(self) -> Digest:
        """The platform manifest's digest: what the store keys builds by."""
        assert self.ref.digest is not None
        return self.ref.digest


@dataclass(frozen=True)
class PulledImage:
    """A resolved image whose config and layers are all in the blob cache."""

    resolved: ResolvedImage
    config: ImageConfig
    config_bytes: bytes
    downloaded_bytes: int
    cached_blobs: int


def resolve(client: RegistryClient, ref: Reference, platform: Platform) -> ResolvedImage:
    """Fetch the manifest ``ref`` names; follow an index to ``platform``'s manifest."""
    found = resolve_manifest(client, ref, platform)
    return ResolvedImage(
        ref.with_digest(found.fetched.digest),
        found.manifest,
        found.fetched.data,
        found.fetched.media_type,
        found.index.digest if found.index else None,
    )


def fetch_config(
    client: RegistryClient, blobs: BlobStore, resolved: ResolvedImage
) -> tuple[ImageConfig, bytes]:
    """Check the manifest's descriptors against the limits, then fetch and parse the config.

    The first step of :func:`pull`, which does it again cheaply (the config is
    cached by then); a caller that needs the diff_ids before the layers come
    (the one-pass build that follows the download) calls it first.
    """
    manifest = resolved.manifest
    max_document, max_blob = client.config.max_manifest_bytes, client.config.max_blob_bytes
    for layer in manifest.layers:
        if layer.media_type not in LAYER_COMPRESSION:
            raise LayerError(
                f"layer {layer.digest} has unsupported media type {layer.media_type!r}"
            )
        if layer.size > max_blob:
            # Refuse before downloading; the download itself stops at the declared size.
            raise LimitExceeded(
                f"layer {layer.digest} is {layer.size} bytes by its descriptor, over the "
                f"{max_blob} byte limit",
                hint="raise it with --max-blob-size",
                api_hint="the server's limit",
            )
    config_desc = manifest.config
    if config_desc.size > max_document:
        # Refuse before downloading: the config is read whole into memory.
        raise LimitExceeded(
            f"the image config {config_desc.digest} is {config_desc.size} bytes by its "
            f"descriptor, over the {max_document} byte limit",
            hint="raise it with --max-manifest-size",
            api_hint="the server's limit",
        )
    if not blobs.has(config_desc.digest):
        with client.open_blob(resolved.ref, config_desc) as chunks:
            blobs.ingest(config_desc, chunks)
    config_bytes = blobs.read(config_desc.digest)
    config = parse_config(config_bytes, max_document)
    if len(config.diff_ids) != len(manifest.layers):
        raise LayerError(
            f"the image config lists {len(config.diff_ids)} diff_ids but the manifest has "
            f"{len(manifest.layers)} layers; the image is malformed"
        )
    return config, config_bytes


def pull(
    client: RegistryClient,
    blobs: BlobStore,
    resolved: ResolvedImage,
    observer: PullObserver | None = None,
) -> PulledImage:
    """Copy the config and every layer of ``resolved`` into ``blobs``; parse the config.

    ``observer`` is told of each blob's progress, and its tap is run once for
    each distinct layer it wants, on the bytes as they download or on the
    cached blob (see :class:`PullObserver`); the taps run while the pull goes
    on, and the pull returns only once every tap has returned.
    """
    observer = observer if observer is not None else PullObserver()
    config, config_bytes = fetch_config(client, blobs, resolved)
    followed = observer.feeds is not None
    # Distinct layers only: an image may list the same blob twice. A build that
    # follows the download reads the top layer first.
    layers = resolved.manifest.layers
    unique = sorted({layer.digest: i for i, layer in enumerate(layers)}.values(), reverse=followed)
    downloaded = cached = 0
    with _Taps(observer) as taps:
        fetch = _Fetch(client, blobs, resolved.ref, observer, taps)
        workers = FOLLOWED_DOWNLOAD_WORKERS if followed else DOWNLOAD_WORKERS
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pull") as pool:
            for size in pool.map(lambda index: fetch(index, layers[index]), unique):
                if size < 0:
                    cached += 1
                else:
                    downloaded += size
    descriptor = _manifest_descriptor(resolved)
    blobs.put(descriptor, resolved.manifest_bytes)
    blobs.tag(descriptor, resolved.ref.pinned())
    return PulledImage(resolved, config, config_bytes, downloaded, cached)


class _Taps:
    """The threads that run one pull's taps, at most :data:`TAP_WORKERS` at once.

    Leaving the ``with`` block waits for them; after a failed pull, taps still
    queued (for a cached blob) are dropped, as the pull raises anyway.
    """

    def __init__(self, observer: PullObserver) -> None:
        self._observer = observer
        self._pool = ThreadPoolExecutor(max_workers=TAP_WORKERS, thread_name_prefix="tap")
        self._futures: list[Future[None]] = []
        self._lock = threading.Lock()
        self._pending = 0  # submitted and not finished: running, or queued for a worker

    def start(
        self, index: int, layer: Descriptor, stream: Callable[[], BinaryIO], *, only_if_idle: bool
    ) -> bool:
        """Submit a tap; with ``only_if_idle``, only if a worker is free to run it now.

        ``stream()`` is called when the tap runs, not before: taps queued for
        thousands of cached layers hold no file open.
        """
        with self._lock:
            if only_if_idle and self._pending >= TAP_WORKERS:
                return False
            self._pending += 1
        self._futures.append(self._pool.submit(self._run, index, layer, stream))
        return True

    def _run(self, index: int, layer: Descriptor, stream: Callable[[], BinaryIO]) -> None:
        try:
            self._observer.tap(index, layer, stream())
        finally:
            with self._lock:
                self._pending -= 1

    def __enter__(self) -> _Taps:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=kind is not None)
        for future in self._futures:
            if not future.cancelled() and future.exception() is not None:
                log.debug("layer tap failed: %r", future.exception())


@dataclass(frozen=True)
class _Fetch:
    """Brings one layer into the cache, telling the observer, tapping it if it wants."""

    client: RegistryClient
    blobs: BlobStore
    ref: Reference
    observer: PullObserver
    taps: _Taps

    def __call__(self, index: int, layer: Descriptor) -> int:
        """The bytes downloaded; -1 if the blob was cached."""
        blobs, observer = self.blobs, self.observer
        tapped = observer.wants(index, layer)
        # A pass reads a cached blob whole (pass 1, checking its diff_id) unless
        # the tap had the layer's scan already: then its digest is checked here.
        if blobs.has(layer.digest) and (tapped or _intact(blobs, layer)):
            observer.start(layer.digest, layer.size, cached=True)
            if observer.feeds is not None:
                observer.feeds.cached(layer.digest, blobs.path(layer.digest))
            if tapped:
                self._tap_cached(index, layer)
            observer.done(layer.digest)
            return -1
        observer.start(layer.digest, layer.size, cached=False)
        pipe = None
        # A tee only into a tap that runs now: a queued one would stall the download.
        if tapped:
            tee = _ChunkPipe()
            if self.taps.start(index, layer, lambda: cast(BinaryIO, tee), only_if_idle=True):
                pipe = tee
        try:
            with self.client.open_blob(self.ref, layer) as chunks:
                chunks = pipe.tee(chunks) if pipe else chunks
                advance = functools.partial(observer.advance, layer.digest)
                blobs.ingest(layer, chunks, on_chunk=advance, feeds=observer.feeds)
        except BaseException as exc:
            if pipe is not None:
                pipe.fail(exc)
            raise
        if observer.feeds is not None:
            observer.feeds.finish(layer.digest, blobs.path(layer.digest))
        if tapped and pipe is None:
            self._tap_cached(index, layer)
        observer.done(layer.digest)
        return layer.size

    def _tap_cached(self, index: int, layer: Descriptor) -> None:
        self.taps.start(index, layer, lambda: self.blobs.open(layer.digest), only_if_idle=False)


def _intact(blobs: BlobStore, layer: Descriptor) -> bool:
    """Does the cached blob still hash to its digest? A rotten one is removed.

    For a layer whose scan came from the scan cache: nothing else in the pull
    reads the whole blob (pass 1 would, checking its diff_id), and the emit
    pass stops after the last body it needs, before gzip's own CRC. Hashing a
    blob costs far less than inflating it, and runs in the download threads.
    """
    try:
        blobs.verify(layer.digest)
    except DigestMismatch:
        log.warning("cached blob %s does not match its digest; downloading it again", layer.digest)
        return False
    except FileNotFoundError:  # a gc in another process took it meanwhile
        return False
    return True


def _manifest_descriptor(resolved: ResolvedImage) -> Descriptor:
    return Descriptor(resolved.media_type, resolved.digest, len(resolved.manifest_bytes))
