"""Cached layers → one merged tar stream → ``rootfs.ext4`` (DESIGN.md steps 4 and 5).

Two ways, same tree. The one-pass way (:mod:`topdown`, the default) reads
each layer once, top layer first, straight into mke2fs, while
the pull downloads it (:class:`Following`), on a disk sized from the manifest
(:func:`one_pass_sizes`) and shrunk to the tree after.
The two-pass way decompresses each layer twice at most: once to scan its
headers (and check its diff_id), once to copy the bodies that survive into
mke2fs's stdin. Its scan can run during the download, as a tap of
:func:`pull.pull` (:class:`LayerScans`), and is kept by blob digest
(:mod:`scancache`), so a blob is scanned only once. The two-pass way is the
reference: the one pass falls back to it whenever it cannot prove it made the
merge's tree. Which way an image takes depends on the image and the tools
only, never on what is cached, so that its disk is the same every time.
Nothing of the image touches the host filesystem but the disk itself.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from hypeman_images.build.options import BuildOptions
from hypeman_images.build.pull import PulledImage
from hypeman_images.disk.e2fsprogs import E2fsprogs, find_e2fsprogs
from hypeman_images.disk.mke2fs import (
    DiskResult,
    OutOfRoom,
    build_disk,
    build_disk_one_pass,
)
from hypeman_images.disk.sizing import SizeInputs
from hypeman_images.layers.compression import Hasher, open_decompressed, sniff
from hypeman_images.layers.emit import write_tar
from hypeman_images.layers.entries import LayerScan
from hypeman_images.layers.limits import Limits
from hypeman_images.layers.merge import Merger, merge
from hypeman_images.layers.onepass import Speculation, TopDown
from hypeman_images.layers.plan import Tree, TreeStats
from hypeman_images.layers.scan import scan_layer
from hypeman_images.layers.scancache import ScanCache
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.spec import LAYER_COMPRESSION, Descriptor
from hypeman_images.store.blobs import BlobStore
from hypeman_images.store.feeds import BlobEnds, FeedAborted, LayerFeeds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiskInfo:
    """The disk a conversion made and what it cost."""

    path: Path
    size_bytes: int
    content_bytes: int
    sha256: str | None
    tool_versions: dict[str, str]
    fallback_used: bool
    timings: dict[str, float] = field(default_factory=dict)
    one_pass: bool = False


@dataclass
class Following:
    """A one-pass build that runs while its pull does (issue 7).

    It reads the layers through ``feeds`` as they download (the disk is
    sized from the manifest, :func:`one_pass_sizes`). Nothing of it lasts
    unless the pull succeeded: :meth:`pulled`, called before the disk is
    finished (and before the two-pass way reads the cache), waits for the
    pull's end and raises if it failed. The pull's caller calls
    :meth:`pull_ended` when it returns.
    """

    feeds: LayerFeeds
    _ended: threading.Event = field(default_factory=threading.Event)
    _error: BaseException | None = None

    def pull_ended(self, error: BaseException | None = None) -> None:
        """The pull returned, or failed with ``error``: readers waiting for bytes then fail."""
        self._error = error
        if error is not None:
            self.feeds.abort(error)
        self._ended.set()

    @property
    def ended(self) -> bool:
        """Has the pull returned (either way)?"""
        return self._ended.is_set()

    def pulled(self) -> None:
        """Wait for the pull; raise :class:`FeedAborted` if it failed."""
        self._ended.wait()
        if self._error is not None:
            raise FeedAborted(f"the pull failed: {self._error}")


def size_inputs(stats: TreeStats) -> SizeInputs:
    """What the disk step needs, from what flatten counted."""
    return SizeInputs(
        inodes=stats.inodes,
        directories=stats.directories,
        file_bytes=stats.regular_bytes,
        file_blocks=stats.regular_blocks,
        long_symlinks=stats.long_symlinks,
        dirent_bytes=stats.directory_entry_bytes,
        xattr_bytes=stats.xattr_bytes,
    )


class LayerScans:
    """Pass 1's results for one pull: from the scan cache, the download, or the cached blob.

    Give it to ``pull(..., tap=scans)`` (it is a :class:`pull.LayerTap`), then to
    :func:`convert`. Before a layer is tapped, :meth:`wants` looks its blob up
    in ``cache`` (:class:`scancache.ScanCache`): a layer scanned before is
    neither tapped nor read again (the pull of the 851 MB image over cached
    blobs, pass 1 included, takes 0.12 s instead of 1.5 s). The others are
    scanned while their bytes
    arrive; :func:`scan_layers` scans what is still missing (a tap that failed,
    a blob listed twice) from the cached blob, checks every diff_id, and only
    then saves new scans to the cache. Use one instance per pull.

    Scans are merged (:class:`merge.Merger`) as soon as every layer below
    them is in, in whichever thread delivered the last of them, so that after
    the last scan only its own layer and the planning are left to do (issue 7:
    ~0.1 s of the 851 MB image's 0.2 s merge came off the critical path).

    The scans run in threads of this process. A child process per layer (a
    GIL of its own) was tried for issue 7 and did not pay: the download (and,
    in the benchmark, the registry) already keep both cores ~85 % busy during
    pass 1, and the children added pipe copies and pickling for no gain
    (2.0-2.2 s either way on the 851 MB, 4-layer image).
    """

    def __init__(
        self, limits: Limits | None = None, cache: ScanCache | None = None, *, tap: bool = True
    ) -> None:
        self.limits = limits or Limits()
        self.cache = cache
        self.tap = tap
        self._scans: dict[int, LayerScan] = {}
        self._in_cache: set[Digest] = set()  # blobs whose scan the cache holds already
        self._lock = threading.Lock()
        self._merger = Merger(self.limits)
        self._merge_error: Exception | None = None
        self._merge_lock = threading.Lock()  # one merging thread at a time, layers in order

    def wants(self, index: int, layer: Descriptor) -> bool:
        """Should the pull tap this layer? If pass 1 :meth:`needs` it, unless ``tap=False``.

        ``tap=False``: the image will be built in one pass (:func:`one_pass_candidate`),
        which reads each layer itself.
        """
        return self.tap and self.needs(index, layer)

    def needs(self, index: int, layer: Descriptor) -> bool:
        """Must pass 1 read this layer? Not if the scan cache has its blob (kept here then)."""
        if self.cache is None:
            return True
        scan = self.cache.load(layer, index, self.limits)
        if scan is None:
            return True
        with self._lock:
            self._scans[index] = scan
            self._in_cache.add(layer.digest)
        self._merge_ready()
        return False

    def __call__(self, index: int, layer: Descriptor, stream: BinaryIO) -> None:
        with _decompressed(stream, layer) as raw:
            scan = scan_layer(raw, index, name=str(layer.digest), limits=self.limits)
        with self._lock:
            self._scans[index] = scan
        self._merge_ready()

    def _merge_ready(self) -> None:
        """Merge every scan whose layers below are all merged; keep the first error."""
        with self._merge_lock:
            while self._merge_error is None:
                scan = self.get(self._merger.layers)
                if scan is None:
                    return
                try:
                    self._merger.add(scan)
                except Exception as exc:  # raised by merged(), in the build's thread
                    self._merge_error = exc

    def merged(self, scans: list[LayerScan]) -> Tree:
        """The tree of ``scans`` (every layer, verified): what is not merged yet is merged now."""
        with self._merge_lock:
            if self._merge_error is not None:
                raise self._merge_error
            for scan in scans[self._merger.layers :]:
                self._merger.add(scan)
            return self._merger.tree()

    def add(self, scan: LayerScan) -> None:
        """A scan made elsewhere (by the one pass), for :meth:`verified` and the two-pass way.

        Not merged here: :meth:`merged` merges it if the two-pass way needs it.
        """
        with self._lock:
            self._scans[scan.index] = scan

    def get(self, index: int) -> LayerScan | None:
        """The scan of layer ``index``, if the tap made one or the cache had it."""
        with self._lock:
            return self._scans.get(index)

    def verified(self, index: int, layer: Descriptor, diff_id: Digest) -> LayerScan:
        """Layer ``index``'s scan, checked against the config's ``diff_id``; new ones saved.

        Raises :class:`LayerError` on a mismatch, and saves nothing then: only a
        scan whose diff_id matched an image config reaches the scan cache.
        """
        scan = self.get(index)
        assert scan is not None, f"layer {index} was never scanned"
        scan.check_diff_id(diff_id)
        with self._lock:
            new = layer.digest not in self._in_cache
            self._in_cache.add(layer.digest)
        if new and self.cache is not None:
            self.cache.save(layer, scan, self.limits)
        return scan

    def clear(self) -> None:
        """Drop the scans and the merge's working tree, once the tree is planned.

        The planned tree keeps only the entries that survive; the working tree
        (a dict per directory, an object per inode: ~170 B an entry) would
        otherwise stay for the whole of mke2fs's run.
        """
        with self._lock:
            self._scans.clear()
        with self._merge_lock:
            self._merger = Merger(self.limits)


def scan_layers(pulled: PulledImage, blobs: BlobStore, done: LayerScans) -> list[LayerScan]:
    """Pass 1: every layer's headers, each checked against the config's diff_id.

    Layers ``done`` has (scanned during the download, or found in its scan
    cache) are not read again; the others are scanned from the cached blob
    under ``done.limits``.
    """
    scans = []
    layers = pulled.resolved.manifest.layers
    for index, (layer, diff_id) in enumerate(zip(layers, pulled.config.diff_ids, strict=True)):
        if done.get(index) is None and done.needs(index, layer):
            done(index, layer, blobs.open(layer.digest))
        scans.append(done.verified(index, layer, diff_id))
    return scans


def _decompressed(source: BinaryIO | Path, layer: Descriptor) -> BinaryIO:
    # Inline for pass 1: inflating there is faster than in a helper thread; the
    # other core is busy with another layer or the download.
    return open_decompressed(source, layer.media_type, name=str(layer.digest))


# Pass 2 inflates in a helper thread (ISA-L drops the GIL), overlapping the
# header writes and copies: 2.1 s -> 1.8 s of emit on the 851 MB image once
# mke2fs got lighter (no metadata_csum). 16 MiB ahead rather than isal's
# threaded reader's 2: the decoder keeps going while mke2fs is busy with
# metadata (a directory or many small files) and is ahead when it wants data
# again: emit 2.1-2.2 s -> 1.9 s on that image (issue 7).
_READ_AHEAD_BLOCKS = 16


def _open_layer_to_emit(
    blobs: BlobStore,
    layer: Descriptor,
    hash_into: Hasher | None = None,
    feeds: LayerFeeds | None = None,
) -> BinaryIO:
    return open_decompressed(
        feeds.open(layer.digest) if feeds is not None else blobs.path(layer.digest),
        layer.media_type,
        name=str(layer.digest),
        read_ahead=_READ_AHEAD_BLOCKS,
        hash_into=hash_into,
    )


class _Counting:
    """A write-only wrapper that reports how many bytes went through.

    It reports once per :data:`REPORT_EVERY` bytes and at :meth:`flush`, not
    per write: a write is often one 512-byte header, and a progress bar's
    update costs more than that write.
    """

    REPORT_EVERY = 4 << 20

    def __init__(self, out: BinaryIO, report: Callable[[int], None]) -> None:
        self._out = out
        self._report = report
        self.count = 0
        self._next = self.REPORT_EVERY

    def write(self, data: bytes | bytearray | memoryview) -> int:
        written = self._out.write(data)
        self.count += len(data)
        if self.count >= self._next:
            self._next = self.count + self.REPORT_EVERY
            self._report(self.count)
        return written

    def flush(self) -> None:
        self._out.flush()
        self._report(self.count)


# The one-pass disk is sized before any layer is read, from the manifest: a gzip
# layer is taken to hold at most this many times its compressed size of tar.
# Debian's layers inflate ~3x, text-heavy ones ~10x; one past it (a big file of
# zeros, a decompression bomb) stops the pass and is built the two-pass way.
ONE_PASS_MAX_RATIO = 32


def one_pass_candidate(layers: Sequence[Descriptor], options: BuildOptions, limits: Limits) -> bool:
    """Will this image try the one-pass way? Known before the pull, from the manifest.

    Every layer type we read (gzip, zstd, plain): the disk is sized from the
    manifest (:func:`one_pass_sizes`), never from what the layers say of
    themselves. The one pass writes each layer as it reads it, up to that
    size: it is taken only when all of it fits within ``limits`` (which a
    build lowers to its disk's room); else pass 1 counts the layers, writing
    nothing, before mke2fs starts.
    """
    return (
        options.one_pass
        and all(
            LAYER_COMPRESSION.get(layer.media_type) in ("gzip", "zstd", "none") for layer in layers
        )
        and sum(one_pass_sizes(layers, limits)) <= limits.max_image_bytes
    )


def one_pass_sizes(layers: Sequence[Descriptor], limits: Limits) -> list[int]:
    """The most tar each layer may inflate to in the one pass: the disk is sized for it.

    From the manifest alone, so the disk is the same whatever the cache held
    and the pass can start before the layers are downloaded: a plain layer's
    own size, a gzip layer's times :data:`ONE_PASS_MAX_RATIO`, each within
    ``limits.max_layer_bytes`` (past those, the limits speak anyway).
    """

    def bound(layer: Descriptor) -> int:
        ratio = 1 if LAYER_COMPRESSION.get(layer.media_type) == "none" else ONE_PASS_MAX_RATIO
        return min(layer.size * ratio, limits.max_layer_bytes)

    return [bound(layer) for layer in layers]


def uncompressed_size(path: Path, layer: Descriptor) -> int | None:
    """The layer's uncompressed size from its cached blob alone; ``None`` if it does not say.

    Only for the progress shown (the disk is sized by :func:`one_pass_sizes`).
    A value below half the blob's size is not believed (a multi-member
    stream, a layer past 4 GiB: see :func:`_stated_size`).
    """
    ends = _file_ends(path)
    if ends is None:
        return None
    stated = _stated_size(ends, layer)
    return stated if stated is not None and stated >= ends.size // 2 else None


def _file_ends(path: Path) -> BlobEnds | None:
    """A whole file's first and last 4 bytes and its size; ``None`` if it cannot be read."""
    try:
        with path.open("rb") as blob:
            head = blob.read(4)
            size = blob.seek(0, 2)
            blob.seek(max(0, size - 4))
            return BlobEnds(head, blob.read(4), size)
    except OSError:
        return None


def _stated_size(ends: BlobEnds, layer: Descriptor) -> int | None:
    """What a whole blob says its layer inflates to; a lower bound.

    A plain tar is its own size. gzip's trailer ends with ISIZE, the input
    size modulo 2**32 (RFC 1952 §2.3.1) of the last member only: never more
    than the layer's real size. ``None`` when the blob says nothing (zstd, not
    gzip at all: reading it will say what is wrong).
    """
    kind = LAYER_COMPRESSION.get(layer.media_type)
    if kind == "none":
        return ends.size
    if kind != "gzip" or ends.size < 18 or sniff(ends.head) != "gzip":
        return None
    return int.from_bytes(ends.tail, "little")


def _stated_by_blob(blobs: BlobStore, layer: Descriptor, feeds: LayerFeeds | None) -> int | None:
    """The least the layer inflates to, as its whole blob says (0 if it says nothing);
    ``None`` while it downloads."""
    ends = feeds.ends(layer.digest) if feeds is not None else _file_ends(blobs.path(layer.digest))
    return (_stated_size(ends, layer) or 0) if ends is not None else None


def _convert_one_pass(
    pulled: PulledImage,
    blobs: BlobStore,
    dest: Path,
    options: BuildOptions,
    on_progress: Callable[[int, int], None] | None,
    tools: E2fsprogs,
    limits: Limits,
    scans: LayerScans,
    sizes: list[int],
    following: Following | None,
) -> DiskInfo:
    """The one-pass way; raises :class:`Speculation` or :class:`OutOfRoom` to fall back."""
    feeds = following.feeds if following is not None else None
    uncompressed = sum(sizes)
    layers = pulled.resolved.manifest.layers
    tar_bytes: list[int] = []

    def progress_total() -> int:
        # The layers' real size once their blobs are all cached (gzip's trailers),
        # for the progress shown; till then the bound the disk was sized for.
        if following is not None and not following.ended:
            return uncompressed  # nothing is shown while the pull runs: no trailer to read
        if not tar_bytes:
            found = [uncompressed_size(blobs.path(layer.digest), layer) for layer in layers]
            if None in found:
                return uncompressed
            tar_bytes.append(sum(size or 0 for size in found))
        return tar_bytes[0]

    diff_ids = pulled.config.diff_ids
    # Layers scanned before (a new tag over cached layers) are not parsed or
    # hashed again; the pull re-hashed their blobs (pull._intact).
    known = {}
    for index, layer in enumerate(layers):
        if scans.get(index) is None and scans.needs(index, layer):  # needs() loads a cached one
            continue
        scan = scans.get(index)
        assert scan is not None
        known[index] = scan

    one_pass = TopDown(
        lambda i, hasher: _open_layer_to_emit(blobs, layers[i], hasher, feeds),
        [str(layer.digest) for layer in layers],
        limits,
        known,
        dict(enumerate(sizes)),
        # Without it a decompression bomb is found out only once the pass has
        # written the disk's worth into mke2fs (a million tiny files in 9 MiB
        # of gzip: 16 s) before falling back to the two passes.
        stated=lambda i: _stated_by_blob(blobs, layers[i], feeds),
    )
    made: list[LayerScan] = []
    merging = ThreadPoolExecutor(1, thread_name_prefix="merge")
    planned: list[Future[Tree]] = []

    def expect(scan: LayerScan) -> None:
        scan.check_diff_id(diff_ids[scan.index])

    def write_stream(out: BinaryIO) -> None:
        with _sink(out, on_progress, progress_total) as sink:
            made.extend(one_pass.run(sink, expect))
            if following is not None:
                # Nothing of a pull that failed may become a disk; mke2fs waits
                # for the end of its stream meanwhile.
                following.pulled()
        for scan in made:
            scans.add(scan)  # kept for the two-pass way if the check fails

    def plan() -> tuple[SizeInputs, list[tuple[bytes, str, bytes]]]:
        stats, fixups = one_pass.planned()
        # The merge the proof needs (~0.15 s of the 851 MB image) runs while the
        # disk is shrunk and hashed; started after the count, not beside it, as
        # both want the GIL.
        planned.append(merging.submit(merge, made, limits))
        return size_inputs(stats), [(f.path, f.name, f.value) for f in fixups]

    def prove() -> None:
        one_pass.check(planned[0].result())

    t0 = time.monotonic()
    try:
        result = build_disk_one_pass(
            dest,
            uncompressed,
            write_stream,
            plan,
            prove,
            seed=pulled.resolved.digest,
            free_space=options.free_space,
            mke2fs=tools,
            compute_sha256=options.disk_digest,
        )
    finally:
        merging.shutdown(wait=True)
    for scan in made:
        scans.verified(scan.index, layers[scan.index], diff_ids[scan.index])  # into the scan cache
    return _disk_info(result, {"one_pass_s": time.monotonic() - t0}, one_pass=True)


def _disk_info(result: DiskResult, timings: dict[str, float], one_pass: bool) -> DiskInfo:
    return DiskInfo(
        path=result.path,
        size_bytes=result.size_bytes,
        content_bytes=result.content_bytes,
        sha256=str(result.sha256) if result.sha256 else None,
        tool_versions={"e2fsprogs": result.tool_version},
        fallback_used=result.fallback_used,
        timings=timings,
        one_pass=one_pass,
    )


@contextlib.contextmanager
def _sink(
    out: BinaryIO, on_progress: Callable[[int, int], None] | None, total: Callable[[], int]
) -> Iterator[BinaryIO]:
    """``out`` (mke2fs's stdin), counting for ``on_progress`` of ``total()``; flushed at the end."""
    sink: BinaryIO = out
    if on_progress is not None:
        report = on_progress

        def counted(n: int) -> None:
            whole = max(1, total())
            report(min(n, whole), whole)

        sink = _Counting(out, counted)  # type: ignore[assignment]
    yield sink
    sink.flush()


def convert(
    pulled: PulledImage,
    *,
    blobs: BlobStore,
    dest: Path,
    options: BuildOptions,
    on_progress: Callable[[int, int], None] | None = None,
    tools: E2fsprogs | None = None,
    limits: Limits | None = None,
    scans: LayerScans | None = None,
    following: Following | None = None,
) -> DiskInfo:
    """Make ``dest`` from the pulled image's cached layers; atomically, or not at all.

    ``scans``: pass 1 already done during the pull, or found in the scan cache
    (see :class:`LayerScans`); what it lacks is scanned under its limits.
    ``following``: the pull is still running; the one pass follows it (see
    :class:`Following`).
    """
    limits = limits or (scans.limits if scans is not None else Limits())
    if scans is None:
        scans = LayerScans(limits)
    tools = tools or find_e2fsprogs(options.mke2fs or "mke2fs")
    timings: dict[str, float] = {}
    layers = pulled.resolved.manifest.layers
    if one_pass_candidate(layers, options, limits) and tools.tar_input and tools.resize2fs:
        t0 = time.monotonic()
        try:
            return _convert_one_pass(
                pulled,
                blobs,
                dest,
                options,
                on_progress,
                tools,
                limits,
                scans,
                one_pass_sizes(layers, limits),
                following,
            )
        except (Speculation, OutOfRoom) as exc:
            log.info("%s: building in two passes: %s", pulled.resolved.digest, exc)
            timings["one_pass_tried_s"] = time.monotonic() - t0

    if following is not None:
        following.pulled()  # the two-pass way reads the cached blobs
    t0 = time.monotonic()
    layer_scans = scan_layers(pulled, blobs, scans)
    tree = scans.merged(layer_scans) if limits == scans.limits else merge(layer_scans, limits)
    del layer_scans
    scans.clear()
    timings["flatten_scan_s"] = time.monotonic() - t0

    def write_stream(out: BinaryIO) -> None:
        with _sink(out, on_progress, lambda: tree.stats.regular_bytes) as sink:
            write_tar(tree, lambda i: _open_layer_to_emit(blobs, layers[i]), sink, limits)

    t0 = time.monotonic()
    result = build_disk(
        dest,
        size_inputs(tree.stats),
        write_stream,
        seed=pulled.resolved.digest,
        free_space=options.free_space,
        mke2fs=tools,
        compute_sha256=options.disk_digest,
        xattr_fixups=[(f.path, f.name, f.value) for f in tree.xattr_fixups],
    )
    timings["mke2fs_s"] = time.monotonic() - t0
    return _disk_info(result, timings, one_pass=False)
