"""One image, end to end: reference → registry → blob cache → flatten → ext4 (or EROFS) → store.

:func:`build_resolved` is the whole pipeline of DESIGN.md for one resolved
reference (``pull.resolve`` does the resolving). It is synchronous and knows
nothing of queues; the manager runs it in workers.
Every stage records itself in ``metadata.json`` so that a crash leaves a
record the next start can resume from, and ``ready`` is written only after
the disk is in place.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from hypeman_images.build import collector
from hypeman_images.build.options import BuildOptions
from hypeman_images.build.progress import Reporter
from hypeman_images.errors import HypemanError, LimitExceeded, StorageError
from hypeman_images.fsutil import storage_error
from hypeman_images.layers.limits import Limits, check_layer_count
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.reference import Reference
from hypeman_images.oci.spec import Descriptor
from hypeman_images.store.blobs import BlobStore
from hypeman_images.store.formats import DiskFormat
from hypeman_images.store.images import (
    ImageRecord,
    ImageStatus,
    ImageStore,
    StoredImage,
    now,
)

if TYPE_CHECKING:
    from hypeman_images.build.convert import Conversion
    from hypeman_images.build.pull import PulledImage, ResolvedImage
    from hypeman_images.build.stream import DiskInfo
    from hypeman_images.registry.client import RegistryClient

log = logging.getLogger(__name__)


@dataclass
class BuildStats:
    """What one build did, for logs, metrics and benchmarks (seconds and bytes)."""

    resolve_s: float = 0.0
    download_s: float = 0.0
    convert_s: float = 0.0
    finish_s: float = 0.0
    downloaded_bytes: int = 0
    cached_blobs: int = 0
    reused: bool = False
    stages: dict[str, float] = field(default_factory=dict)
    # A disk cache asked: "hit", "miss" or "fallback" (why: an error's code).
    disk_cache: str | None = None
    disk_cache_reason: str | None = None
    fetched_bytes: int = 0


def initial_record(
    ref: Reference, digest: Digest, status: ImageStatus, fmt: DiskFormat = DiskFormat.EXT4
) -> ImageRecord:
    """The record of a build (of a ``fmt`` disk) that has just been asked for."""
    return ImageRecord(
        name=ref.pinned(), digest=str(digest), status=status, created_at=now(), format=fmt
    )


# mke2fs's own metadata (inode tables, bitmaps, directories) on top of the
# content: the disk layouts disk/sizing.py makes spend less than a sixteenth on it.
_METADATA_SHARE = 16
_MiB = 1 << 20


def room_for_content(free: int, downloading: int, free_space: int) -> int:
    """The most uncompressed image content a build may write with ``free`` bytes free.

    ``downloading``: the compressed bytes still to fetch into the blob cache,
    which lives on the same filesystem; ``free_space``: the free space asked
    for inside the disk. What is left, less mke2fs's metadata share, is what
    the layers may inflate to before the disk could no longer fit (never
    negative). A snapshot, not a reservation: two builds that start together
    each see the whole of it.
    """
    left = free - downloading
    return max(0, left - left // _METADATA_SHARE - free_space)


@dataclass(frozen=True)
class Room:
    """The free space of the data dir's filesystem when a build starts, and what it leaves.

    :attr:`content` is what the build's byte limits are lowered to
    (:func:`build_limits`). A layer that inflates past it means the disk is too
    small for the image, not that the image is hostile: :meth:`shortfall`
    says so (docs/security.md, "A data dir too small for the image").
    """

    root: Path
    free: int
    downloading: int  # compressed bytes still to fetch into the blob cache
    free_space: int  # asked for inside the disk

    @property
    def content(self) -> int:
        """The most uncompressed image content that fits (:func:`room_for_content`)."""
        return room_for_content(self.free, self.downloading, self.free_space)

    def needs(self, content: int) -> int:
        """The free space ``content`` bytes of image content need: with that much free,
        :func:`room_for_content` has room for them (and with a sixteenth less, not)."""
        share = _METADATA_SHARE
        return self.downloading + -(-(content + self.free_space) * share // (share - 1))

    def shortfall(self, content: int, *, exact: bool) -> StorageError:
        """The build does not fit: ``content`` is the image's size, or (not ``exact``) less."""
        need, about = -(-self.needs(content) // _MiB), "about" if exact else "more than"
        return StorageError(
            f"no room in the data dir: {self.root} has {self.free // _MiB} MiB free; this "
            f"image needs {about} {need} MiB (its layers inflate to {about} "
            f"{-(-content // _MiB)} MiB, plus the "
            "downloads, mke2fs's metadata and the disk's free space): free space there "
            "or use a data dir on a bigger disk"
        )


def build_limits(
    resolved: ResolvedImage, blobs: BlobStore, store: ImageStore, options: BuildOptions
) -> tuple[Limits, Room | None]:
    """``options.limits``, with the byte limits lowered to what the data dir has room for.

    Also that room (``None`` when ``options.check_space`` is off).
    """
    if not options.check_space:
        return options.limits, None
    try:
        free = shutil.disk_usage(store.root).free
    except OSError as exc:
        raise storage_error(exc, f"cannot read the free space of {store.root}") from exc
    layers = resolved.manifest.layers
    downloading = sum(layer.size for layer in layers if not blobs.has(layer.digest))
    room = Room(store.root, free, downloading, options.free_space)
    log.debug("%s: room for %d bytes of content (%d free)", resolved.ref, room.content, free)
    return options.limits.within(room.content), room


def check_room(layers: Sequence[Descriptor], room: Room | None) -> None:
    """Raise :class:`StorageError` before any download if the layers cannot fit inflated.

    No layer inflates to much less than its blob: deflate stores what it cannot
    compress in blocks of up to 64 KiB behind 5 bytes of header (RFC 1951
    3.2.4), zstd in raw blocks behind 3 (RFC 8878 3.1.1.2).
    """
    if room is None:
        return
    least = sum(max(0, layer.size - layer.size // 1024 - 64) for layer in layers)
    if least > room.content:
        raise room.shortfall(least, exact=False)


def _shortfall(
    exc: LimitExceeded,
    limits: Limits,
    options: BuildOptions,
    room: Room | None,
    layers: Sequence[Descriptor],
    blobs: BlobStore,
) -> HypemanError:
    """A byte limit that was lowered to the data dir's room stopped the build: say that
    the disk is too small, with what the image needs, unless the image is over the
    configured limits too (then it stays :class:`LimitExceeded`)."""
    lowered = [
        name
        for name in ("max_layer_bytes", "max_image_bytes")
        if getattr(limits, name) < getattr(options.limits, name)
        and f"Limits.{name}=" in exc.message
    ]
    if room is None or not lowered:
        return exc
    stated = _stated_sizes(layers, blobs)
    configured = options.limits
    for index, size in enumerate(stated):
        if size is not None and size > configured.max_layer_bytes:
            return LimitExceeded(
                f"layer {index} ({layers[index].digest}) inflates to {size} bytes by its "
                f"gzip trailer, over Limits.max_layer_bytes={configured.max_layer_bytes}; "
                "raise that limit if the image is trusted"
            )
    total = sum(size or 0 for size in stated)
    if total > configured.max_image_bytes:
        return LimitExceeded(
            f"image inflates to {total} bytes by its layers' gzip trailers, over "
            f"Limits.max_image_bytes={configured.max_image_bytes}; raise that limit if the "
            "image is trusted"
        )
    exact = None not in stated and total > room.content
    # It inflated past the room whatever its blobs say.
    return room.shortfall(max(total, room.content + 1), exact=exact)


def _stated_sizes(layers: Sequence[Descriptor], blobs: BlobStore) -> list[int | None]:
    """Each layer's uncompressed size as its cached blob says it; ``None`` where it
    says nothing (zstd) or is not cached."""
    from hypeman_images.build.onepass import uncompressed_size

    return [
        uncompressed_size(blobs.path(layer.digest), layer) if blobs.has(layer.digest) else None
        for layer in layers
    ]


def build_resolved(
    resolved: ResolvedImage,
    *,
    client: RegistryClient,
    blobs: BlobStore,
    store: ImageStore,
    options: BuildOptions,
    reporter: Reporter,
    on_status: Callable[[Reference, ImageRecord], None] | None,
    stats: BuildStats,
) -> StoredImage:
    """Build a resolved image into a ready disk (or reuse one) and point its tag at it.

    Runs under the digest's build lock, so one build per digest across
    processes. Raises a :class:`HypemanError` subclass on failure, after
    recording the failure in the digest's metadata.
    """
    # Imported here: the disk cache needs zstandard and the fleet code, which a
    # re-pull of a ready digest (the CLI's fast path) never loads; converting
    # needs isal and the disk code too, which a disk from the cache never does.
    from hypeman_images.build.diskcache import built_fields, fetch_cached

    ref, digest, fmt = resolved.ref, resolved.digest, options.format
    with store.lock(ref, digest), collector.collect_rarely():
        existing = store.read(ref, digest, fmt)
        ready = existing is not None and existing.status is ImageStatus.READY
        if ready and (store.digest_dir(ref, digest) / fmt.disk_name).is_file():
            # A ready digest needs no download and no rebuild: only the tag may move.
            stats.reused = True
            store.set_tag(ref, digest)
            reporter.stage("ready", f"{_shown(ref)} (already built)")
            return store.find(ref, fmt)

        record = _Record(store, ref, digest, on_status, _pulling(resolved, existing, options))
        limits, room = build_limits(resolved, blobs, store, options)
        layers = resolved.manifest.layers
        dest = store.digest_dir(ref, digest) / fmt.disk_name

        def explain(exc: LimitExceeded) -> HypemanError:
            return _shortfall(exc, limits, options, room, layers, blobs)

        if _looks_in_cache(options):
            with record.failures(explain):
                fetched = fetch_cached(
                    resolved, client=client, blobs=blobs, dest=dest, options=options,
                    limits=limits, record=record.current, publish=record.set,
                    reporter=reporter, stats=stats,
                )  # fmt: skip
            if fetched is not None:  # the disk is in place: as a built one, from here on
                record.set(fetched)
                store.set_tag(ref, digest)
                reporter.stage("ready", f"{ref.familiar()} (from the disk cache)")
                return store.find(ref, fmt)
        from hypeman_images.build.convert import Conversion

        conversion = Conversion(
            resolved, blobs=blobs, dest=dest, options=options, limits=limits, reporter=reporter
        )
        # The failure is recorded before the conversion closes (and waits for its threads).
        with conversion, record.failures(explain):
            check_layer_count(len(layers), limits)  # before any download
            check_room(layers, room)
            disk = _pull_and_convert(resolved, conversion, client, blobs, reporter, record, stats)
        # The disk is in place: from here on a failure (tagging, say) must not
        # demote the record, or a complete disk would sit beside a "failed" one.
        t0 = time.monotonic()
        record.set(
            record.current.evolve(
                status=ImageStatus.READY,
                size_bytes=disk.size_bytes,
                content_bytes=disk.content_bytes,
                disk_sha256=disk.sha256,
                tool_versions=disk.tool_versions,
                **built_fields(disk.one_pass, disk.fallback_used),
            )
        )
        store.set_tag(ref, digest)
        stats.finish_s = time.monotonic() - t0
    reporter.stage("ready", _shown(ref))
    return store.find(ref, fmt)


def _looks_in_cache(options: BuildOptions) -> bool:
    """Does this build look in a disk cache first? For a disk of either format: the
    cache holds each format's disks under recipes of that format (docs/disk-artifacts.md)."""
    cache = options.disk_cache
    return cache is not None and cache.looks


def _pull_and_convert(
    resolved: ResolvedImage,
    conversion: Conversion,
    client: RegistryClient,
    blobs: BlobStore,
    reporter: Reporter,
    record: _Record,
    stats: BuildStats,
) -> DiskInfo:
    """The pull, with the conversion beside it; then the disk, from the conversion."""
    # Imported here: the pull needs the registry client (httpx), which the
    # commands that only read the store (list, inspect, rm, tag) never load,
    # though the manager they use imports this module (tests/cli/test_cli_startup.py).
    from hypeman_images.build.pull import pull

    ref = resolved.ref
    reporter.stage("pulling", _shown(ref))
    t0 = time.monotonic()
    conversion.start(client)
    pulled = pull(client, blobs, resolved, conversion.observer)
    stats.download_s = time.monotonic() - t0
    stats.downloaded_bytes = pulled.downloaded_bytes
    stats.cached_blobs = pulled.cached_blobs
    record.set(with_config(record.current, pulled).evolve(status=ImageStatus.CONVERTING))

    layers = len(resolved.manifest.layers)
    shape = f"{layers} layer{'' if layers == 1 else 's'} → {record.current.format}"
    reporter.stage("converting", shape)
    t0 = time.monotonic()
    disk = conversion.finish(pulled)
    stats.convert_s = time.monotonic() - t0
    stats.stages.update(disk.timings)
    return disk


def _shown(ref: Reference) -> str:
    """``alpine:3.20 (0d78bce208e7)``: a resolved name for progress lines, its digest short."""
    if ref.tag is None or ref.digest is None:
        return ref.familiar()
    return f"{ref.with_tag(ref.tag).familiar()} ({ref.digest.short})"


def _pulling(
    resolved: ResolvedImage, existing: ImageRecord | None, options: BuildOptions
) -> ImageRecord:
    """The record of a build that starts pulling (over an earlier record, if any)."""
    ref, digest = resolved.ref, resolved.digest
    record = initial_record(ref, digest, ImageStatus.PULLING, options.format)
    if existing is not None:
        record = existing.evolve(status=ImageStatus.PULLING, error=None, name=record.name)
    # Name the blobs from the start, so a gc during the download keeps them.
    return record.evolve(
        config_digest=str(resolved.manifest.config.digest),
        layers=[str(layer.digest) for layer in resolved.manifest.layers],
        free_space_bytes=options.free_space,
        index_digest=str(resolved.index_digest) if resolved.index_digest else None,
    )


class _Record:
    """A build's record of its digest, from ``first``: each change written, then announced."""

    def __init__(
        self,
        store: ImageStore,
        ref: Reference,
        digest: Digest,
        on_status: Callable[[Reference, ImageRecord], None] | None,
        first: ImageRecord,
    ) -> None:
        self._store = store
        self._ref = ref
        self._digest = digest
        self._on_status = on_status
        self.current = first
        self.set(first)

    def set(self, record: ImageRecord) -> None:
        """Write ``record`` and tell ``on_status``."""
        self.current = record = self._store.write(self._ref, self._digest, record)
        if self._on_status:
            self._on_status(self._ref, record)

    @contextlib.contextmanager
    def failures(self, explain: Callable[[LimitExceeded], HypemanError]) -> Iterator[None]:
        """Record any failure inside as the build's (``failed``, and why), then re-raise it.

        A :class:`LimitExceeded` is first passed through ``explain``, which may
        tell a more accurate story (:func:`_shortfall`).
        """
        try:
            yield
        except LimitExceeded as exc:
            explained = explain(exc)
            self._failed(explained.detail)
            if explained is exc:
                raise
            raise explained from exc
        except HypemanError as exc:
            self._failed(exc.detail)  # what went wrong, for the CLI's and the API's readers
            raise
        except Exception as exc:  # the build's top level: record, then re-raise
            self._failed(f"internal error: {exc!r}")
            raise

    def _failed(self, error: str) -> None:
        self.set(self.current.evolve(status=ImageStatus.FAILED, error=error))


def with_config(record: ImageRecord, pulled: PulledImage) -> ImageRecord:
    """``record`` with what the image config says: how to run the image, its layers."""
    config = pulled.config
    manifest = pulled.resolved.manifest
    return record.evolve(
        entrypoint=list(config.entrypoint) if config.entrypoint is not None else None,
        cmd=list(config.cmd) if config.cmd is not None else None,
        env=list(config.env),
        working_dir=config.working_dir,
        user=config.user,
        exposed_ports=list(config.exposed_ports),
        volumes=list(config.volumes),
        labels=dict(config.labels),
        stop_signal=config.stop_signal,
        platform=str(config.platform),
        config_digest=str(manifest.config.digest),
        manifest_media_type=pulled.resolved.media_type,
        layers=[str(layer.digest) for layer in manifest.layers],
        image_created=config.created,
    )


__all__ = [
    "BuildStats",
    "Room",
    "build_limits",
    "build_resolved",
    "check_room",
    "initial_record",
    "room_for_content",
    "with_config",
]
