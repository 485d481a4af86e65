"""Resolve a reference to one platform's manifest and copy its blobs into the cache.

This is the "registry → blob store" edge of the pipeline. Resolution turns a
normalised reference into a resolved one (digest always present: the platform
manifest's). Blobs already in the cache are not fetched again; the others are
downloaded in parallel, each verified against its digest on the way in.

A *tap* (``pull(..., tap=...)``) sees every layer's compressed bytes while
they arrive -- a tee from the download, in its own thread -- or, for a layer
already cached (or downloaded while every tap worker was busy), reads the
cached blob, so that the flattener's first pass overlaps with the downloads
instead of following them (issue 7). A layer the tap does not want (its scan
is known already) is not tapped at all. The tap is
an optimisation only: what it makes is used after the pull verified every
digest, and if it fails, the caller does that work again from the cache.
"""

from __future__ import annotations

import io
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO, Protocol, cast

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
from hypeman_images.registry import client as registry
from hypeman_images.registry.client import RegistryClient
from hypeman_images.store.blobs import BlobStore
from hypeman_images.store.feeds import LayerFeeds

log = logging.getLogger(__name__)

DOWNLOAD_WORKERS = 4
# Downloads at once for a build that follows them (``feeds``), which reads the
# layers top first, one after the other: on a link that the downloads fill, four
# at once gave the top layer a quarter of it and the build waited (851 MB image
# at 100 MB/s: 4.9 s; two at once 3.9 s; one 3.55 s, the download alone 3.05 s).
# Not one: a registry that caps each connection would then be four times slower.
FOLLOWED_DOWNLOAD_WORKERS = 2
# Chunks (>= 1 MiB each) a tap may lag behind its download before the download waits.
# 4, not 8: with four layers in flight the queues were ~30 MiB of the peak RSS
# (issue 7), and a deeper queue did not make the pull faster.
TAP_QUEUE_CHUNKS = 4
# Taps running at once. A tap is CPU-bound (inflate, sha256, header parsing),
# so more of them than cores only adds buffers (~10 MiB each) and GIL hand-offs;
# a layer that finds them all busy downloads untapped and is read back from the
# cache when one frees (issue 7: peak RSS grew with the number of layers).
TAP_WORKERS = min(DOWNLOAD_WORKERS, max(2, os.cpu_count() or 2))


class LayerTap(Protocol):
    """Reads one layer's compressed bytes (in a thread of its own) while they are pulled.

    ``stream`` ends at the blob's end; reading it fails if the download does.
    The tap must close it (closing early is fine: the download goes on).
    """

    def wants(self, index: int, layer: Descriptor) -> bool:
        """Asked once per distinct layer, before its download: False leaves it untapped."""
        ...

    def __call__(self, index: int, layer: Descriptor, stream: BinaryIO) -> None: ...


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


class LayerProgress:
    """Callbacks a front end implements to show downloads; all optional no-ops here."""

    def start(self, digest: Digest, size: int, cached: bool) -> None:
        """A blob download begins (or is skipped because ``cached``)."""

    def advance(self, digest: Digest, nbytes: int) -> None:
        """``nbytes`` more of the blob arrived."""

    def done(self, digest: Digest) -> None:
        """The blob is verified and in the cache."""


def resolve(client: RegistryClient, ref: Reference, platform: Platform) -> ResolvedImage:
    """Fetch the manifest ``ref`` names; follow an index to ``platform``'s manifest."""
    found = registry.resolve(client, ref, platform)
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
                f"{max_blob} byte limit (raise it with --max-blob-size)"
            )
    config_desc = manifest.config
    if config_desc.size > max_document:
        # Refuse before downloading: the config is read whole into memory.
        raise LimitExceeded(
            f"the image config {config_desc.digest} is {config_desc.size} bytes by its "
            f"descriptor, over the {max_document} byte limit (raise it with --max-manifest-size)"
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
    progress: LayerProgress | None = None,
    on_bytes: Callable[[int], None] | None = None,
    tap: LayerTap | None = None,
    feeds: LayerFeeds | None = None,
) -> PulledImage:
    """Copy the config and every layer of ``resolved`` into ``blobs``; parse the config.

    ``tap``, if given, is run once for each distinct layer it wants, on the bytes
    as they download or on the cached blob (see :class:`LayerTap`); it runs while the
    pull goes on, and the pull returns only once every tap has returned. Taps'
    exceptions are logged, never raised: the pull's own errors are the ones
    that count. ``feeds``, if given, is told where each layer's bytes are as
    they arrive (:mod:`feeds`), and the layers download top layer first.
    """
    progress = progress or LayerProgress()
    manifest = resolved.manifest
    config, config_bytes = fetch_config(client, blobs, resolved)

    downloaded = 0
    cached = 0

    taps: list[Future[None]] = []
    tap_pool = ThreadPoolExecutor(max_workers=TAP_WORKERS, thread_name_prefix="tap")
    tap_lock = threading.Lock()
    taps_pending = 0  # submitted and not finished: running, or queued for a worker

    def run_tap(index: int, layer: Descriptor, stream: BinaryIO) -> None:
        nonlocal taps_pending
        assert tap is not None
        try:
            tap(index, layer, stream)
        finally:
            with tap_lock:
                taps_pending -= 1

    def start_tap(
        index: int, layer: Descriptor, stream: Callable[[], BinaryIO], *, only_if_idle: bool
    ) -> bool:
        """Submit a tap; with ``only_if_idle``, only if a worker is free to run it now."""
        nonlocal taps_pending
        with tap_lock:
            if only_if_idle and taps_pending >= TAP_WORKERS:
                return False
            taps_pending += 1
        taps.append(tap_pool.submit(run_tap, index, layer, stream()))
        return True

    def fetch(index: int) -> int:
        layer = manifest.layers[index]
        tapped = tap is not None and tap.wants(index, layer)
        # A pass reads a cached blob whole (pass 1, checking its diff_id) unless
        # the tap had the layer's scan already: then its digest is checked here.
        if blobs.has(layer.digest) and (tap is None or tapped or _intact(blobs, layer)):
            progress.start(layer.digest, layer.size, cached=True)
            if feeds is not None:
                feeds.cached(layer.digest, blobs.path(layer.digest))
            if tapped:
                start_tap(index, layer, lambda: blobs.open(layer.digest), only_if_idle=False)
            progress.done(layer.digest)
            return -1

        def advance(nbytes: int) -> None:
            progress.advance(layer.digest, nbytes)
            if on_bytes:
                on_bytes(nbytes)

        progress.start(layer.digest, layer.size, cached=False)
        pipe = None
        # A tee only into a tap that runs now: a queued one would stall the download.
        if tapped:
            tee = _ChunkPipe()
            if start_tap(index, layer, lambda: cast(BinaryIO, tee), only_if_idle=True):
                pipe = tee
        try:
            with client.open_blob(resolved.ref, layer) as chunks:
                chunks = pipe.tee(chunks) if pipe else chunks
                blobs.ingest(layer, chunks, on_chunk=advance, feeds=feeds)
        except BaseException as exc:
            if pipe is not None:
                pipe.fail(exc)
            raise
        if feeds is not None:
            feeds.finish(layer.digest)
        if tapped and pipe is None:
            start_tap(index, layer, lambda: blobs.open(layer.digest), only_if_idle=False)
        progress.done(layer.digest)
        return layer.size

    # Distinct layers only: an image may list the same blob twice. A build that
    # follows the download reads the top layer first.
    unique = sorted(
        {layer.digest: i for i, layer in enumerate(manifest.layers)}.values(),
        reverse=feeds is not None,
    )
    pulled = False
    try:
        workers = DOWNLOAD_WORKERS if feeds is None else FOLLOWED_DOWNLOAD_WORKERS
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pull") as pool:
            for size in pool.map(fetch, unique):
                if size < 0:
                    cached += 1
                else:
                    downloaded += size
        pulled = True
    finally:
        # A failed pull raises anyway: taps still queued for the cache are dropped.
        tap_pool.shutdown(wait=True, cancel_futures=not pulled)
        for future in taps:
            if not future.cancelled() and future.exception() is not None:
                log.debug("layer tap failed: %r", future.exception())
    descriptor = _manifest_descriptor(resolved)
    blobs.put(descriptor, resolved.manifest_bytes)
    blobs.tag(descriptor, resolved.ref.pinned())
    return PulledImage(resolved, config, config_bytes, downloaded, cached)


def _intact(blobs: BlobStore, layer: Descriptor) -> bool:
    """Does the cached blob still hash to its digest? A rotten one is removed.

    For a layer whose scan came from the scan cache: nothing else in the pull
    reads the whole blob (pass 1 would, checking its diff_id), and the emit
    pass stops after the last body it needs, before gzip's own CRC. ~0.2 s of
    sha256 for 300 MB of blobs, in the download threads.
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
