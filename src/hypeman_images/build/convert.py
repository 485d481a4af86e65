"""Cached layers → one merged tar stream → ``rootfs.ext4`` (DESIGN.md steps 4 and 5).

Two ways, same tree. The one-pass way (:mod:`build.onepass`, the default)
reads each layer once, top layer first, straight into mke2fs, while the pull
downloads it (through :mod:`store.feeds`), on a disk sized from the manifest
and shrunk to the tree after. The two-pass way decompresses each layer twice
at most: once to scan its headers (and check its diff_id), once to copy the
bodies that survive into mke2fs's stdin. Its scan can run during the
download, as the pull's tap (:class:`LayerScans`), and is kept by blob digest
(:mod:`scancache`), so a blob is scanned only once. The two-pass way is the
reference: the one pass falls back to it whenever it cannot prove it made the
merge's tree. An EROFS disk takes the same ways: its one pass
(:mod:`build.onepass_erofs`) writes the bodies into the image as the layers
download and the merge's inodes after; its two passes (:mod:`build.erofs`)
write the merge's tree from the cached blobs. Both give the same bytes.

:class:`Conversion` owns all of it for one build and decides the way, in one
place. Which way an image takes depends on the image and the tools only,
never on what is cached, so that its disk is the same every time. Nothing of
the image touches the host filesystem but the disk itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from hypeman_images.build.erofs import build_erofs
from hypeman_images.build.observer import PullObserver
from hypeman_images.build.onepass import OnePass, PullEnd
from hypeman_images.build.onepass_erofs import build_erofs_one_pass
from hypeman_images.build.oneplan import one_pass_candidate
from hypeman_images.build.options import BuildOptions
from hypeman_images.build.progress import Reporter
from hypeman_images.build.pull import PulledImage, ResolvedImage, fetch_config
from hypeman_images.build.stream import DiskInfo, counted, disk_info, open_layer, size_inputs
from hypeman_images.disk.e2fsprogs import TOOLS_FILE, E2fsprogs, find_e2fsprogs
from hypeman_images.disk.mke2fs import OutOfRoom, build_disk
from hypeman_images.errors import HypemanError
from hypeman_images.layers.compression import open_decompressed
from hypeman_images.layers.emit import write_tar
from hypeman_images.layers.entries import LayerScan
from hypeman_images.layers.limits import Limits
from hypeman_images.layers.merge import Merger
from hypeman_images.layers.onepass import Speculation
from hypeman_images.layers.plan import Tree
from hypeman_images.layers.scan import scan_layer
from hypeman_images.layers.scancache import ScanCache
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.spec import Descriptor
from hypeman_images.registry.client import RegistryClient
from hypeman_images.store.blobs import BlobStore
from hypeman_images.store.feeds import LayerFeeds
from hypeman_images.store.formats import DiskFormat

log = logging.getLogger(__name__)


class LayerScans:
    """Pass 1's results for one pull: from the scan cache, the download, or the cached blob.

    A :class:`Conversion` taps its pull with it (:meth:`wants`, then a call
    per layer, in the pull's tap threads), then reads it. Before a layer is
    tapped, :meth:`wants` looks its blob up in ``cache``
    (:class:`scancache.ScanCache`): a layer scanned before is neither tapped
    nor read again, so a new tag over cached blobs skips pass 1 altogether.
    The others are scanned while their bytes arrive; :func:`scan_layers`
    scans what is still missing (a tap that failed, a blob listed twice) from
    the cached blob, checks every diff_id, and only then saves new scans to
    the cache. Use one instance per pull.

    Scans are merged (:class:`merge.Merger`) as soon as every layer below
    them is in, in whichever thread delivered the last of them, so that after
    the last scan only its own layer and the planning are left to do: most of
    the merge comes off the critical path.

    The scans run in threads of this process. A child process per layer (a
    GIL of its own) does not pay: the download (and, in the benchmark, the
    registry) already keep both cores busy during pass 1, and the children
    add pipe copies and pickling for no gain.
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

        ``tap=False``: the image will be built in one pass
        (:func:`oneplan.one_pass_candidate`), which reads each layer itself.
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

    def known(self, layers: Sequence[Descriptor]) -> dict[int, LayerScan]:
        """The scans made already or kept in the scan cache, by layer index.

        The one pass uses them instead of parsing and hashing those layers again
        (a new tag over cached layers); the pull re-hashed their blobs
        (:func:`pull._intact`).
        """
        known = {}
        for index, layer in enumerate(layers):
            if self.get(index) is None and self.needs(index, layer):  # needs() loads a cached one
                continue
            scan = self.get(index)
            assert scan is not None
            known[index] = scan
        return known

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


class Conversion:
    """One build's conversion of its layers into ``dest``, from before its pull to the disk.

    It owns what the conversion shares with the pull and the threads it runs
    in: pass 1's :attr:`scans`, the feeds through which a one pass follows the
    downloads, the probe of mke2fs (ext4 only), and the thread of a one pass that runs
    while the pull does. It decides which way the image takes
    (:meth:`_convert`); nothing of it lasts unless the pull succeeded.

    In the build's thread, in this order:

    - :meth:`start`, before the pull: probes mke2fs and, for an image built
      in one pass, fetches its config (the diff_ids) and starts the pass,
      which reads the layers as they download;
    - ``pull(..., conversion.observer)``: the pull reports to the reporter,
      and feeds the conversion, through :attr:`observer`;
    - :meth:`finish`, once the pull returned: the disk (atomically, or not at all);
    - :meth:`abort`, if the pull or the build failed instead: a one pass stops
      and makes no disk;
    - :meth:`close`, always (``with`` does it): aborts if the pull's end was
      never said, waits for the threads, releases the feeds.
    """

    def __init__(
        self,
        resolved: ResolvedImage,
        *,
        blobs: BlobStore,
        dest: Path,
        options: BuildOptions,
        limits: Limits,
        reporter: Reporter,
    ) -> None:
        self._resolved = resolved
        self._blobs = blobs
        self._dest = dest
        self._options = options
        self._limits = limits
        self._reporter = reporter
        # Which way, from the manifest and options alone (the tools are asked in
        # _convert): an image built in one pass reads its layers while they
        # download, top layer first. Else pass 1 runs on each layer while it
        # downloads, unless the scan cache beside the blobs has it.
        self.erofs = options.format is DiskFormat.EROFS
        self.one_pass = one_pass_candidate(resolved.manifest.layers, options, limits)
        self.scans = LayerScans(limits, ScanCache.beside(blobs), tap=not self.one_pass)
        self._feeds = LayerFeeds() if self.one_pass else None
        self._pull = PullEnd()
        self._tools: Future[E2fsprogs] | None = None
        self._converting = ThreadPoolExecutor(1, thread_name_prefix="convert")
        self._early: Future[DiskInfo] | None = None
        self.observer: PullObserver = _Observer(reporter, self.scans, self._feeds)

    def __enter__(self) -> Conversion:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def start(self, client: RegistryClient) -> None:
        """Before the pull: probe mke2fs (not for EROFS: the writer is ours); start the one
        pass if the image takes it."""
        if not self.erofs:
            # mke2fs's probe (two runs of it, the first time in a process) while the layers
            # download.
            probe = ThreadPoolExecutor(1, thread_name_prefix="probe")
            mke2fs = self._options.mke2fs or "mke2fs"
            remember = self._blobs.root / TOOLS_FILE
            self._tools = probe.submit(find_e2fsprogs, mke2fs, remember=remember)
            probe.shutdown(wait=False)  # its one thread ends with the probe; result() waits
        if self.one_pass:
            config, config_bytes = fetch_config(client, self._blobs, self._resolved)
            early = PulledImage(self._resolved, config, config_bytes, 0, 0)
            self._early = self._converting.submit(self._convert, early)

    def finish(self, pulled: PulledImage) -> DiskInfo:
        """The pull returned: the disk, made by then or now."""
        self._pull.set()
        return self._early.result() if self._early is not None else self._convert(pulled)

    def abort(self, error: BaseException) -> None:
        """The pull failed, or the build did: a one pass that follows it stops
        (it neither waits for ever nor finishes a disk)."""
        self._pull.set(error)
        if self._feeds is not None:
            self._feeds.abort(error)

    def close(self) -> None:
        """Abort if the pull's end was never said; wait for the threads; release the feeds."""
        if not self._pull.ended:
            self.abort(HypemanError("the build failed before converting"))
        self._converting.shutdown(wait=True)
        if self._feeds is not None:
            self._feeds.close()

    def _convert(self, pulled: PulledImage) -> DiskInfo:
        """The one-pass way if the image takes it and mke2fs can (EROFS: always then);
        else, or when it cannot prove its tree, the two-pass way."""
        tools = None
        if not self.erofs:
            assert self._tools is not None, "start() first"
            tools = self._tools.result()
        timings: dict[str, float] = {}
        if self.one_pass and (tools is None or (tools.tar_input and tools.resize2fs)):
            t0 = time.monotonic()
            try:
                return self._one_pass(pulled, tools)
            except (Speculation, OutOfRoom) as exc:
                log.info("%s: building in two passes: %s", pulled.resolved.digest, exc)
                timings["one_pass_tried_s"] = time.monotonic() - t0
        self._pull.wait()  # the two-pass way reads the cached blobs
        if tools is None:
            return self._erofs(pulled, timings)
        return self._two_pass(pulled, tools, timings)

    def _one_pass(self, pulled: PulledImage, tools: E2fsprogs | None) -> DiskInfo:
        """The one-pass way, into mke2fs (``tools``) or the EROFS writer (``None``);
        raises :class:`Speculation` or :class:`OutOfRoom` to fall back."""
        assert self._feeds is not None
        layers = pulled.resolved.manifest.layers
        one_pass = OnePass(
            pulled,
            blobs=self._blobs,
            feeds=self._feeds,
            pull=self._pull,
            limits=self._limits,
            known=self.scans.known(layers),
            report=self._report,
        )
        try:
            if tools is not None:
                disk = one_pass.build(self._dest, self._options, tools)
            else:
                disk = build_erofs_one_pass(
                    self._dest,
                    one_pass,
                    seed=pulled.resolved.digest,
                    compute_sha256=self._options.disk_digest,
                    report=self._report,
                )
        finally:
            for scan in one_pass.made:
                self.scans.add(scan)  # kept for the two-pass way if the proof fails
        diff_ids = pulled.config.diff_ids
        for scan in one_pass.made:
            self.scans.verified(scan.index, layers[scan.index], diff_ids[scan.index])  # saved
        return disk

    def _two_pass(
        self, pulled: PulledImage, tools: E2fsprogs, timings: dict[str, float]
    ) -> DiskInfo:
        """The two-pass way, the reference: scan (what is not scanned yet), merge, emit."""
        tree = self._merged(pulled, timings)
        t0 = time.monotonic()
        result = build_disk(
            self._dest,
            size_inputs(tree.stats),
            lambda out: self._emit(pulled, tree, out),
            seed=pulled.resolved.digest,
            free_space=self._options.free_space,
            mke2fs=tools,
            compute_sha256=self._options.disk_digest,
            xattr_fixups=[(f.path, f.name, f.value) for f in tree.xattr_fixups],
        )
        timings["mke2fs_s"] = time.monotonic() - t0
        return disk_info(result, timings, one_pass=False)

    def _merged(self, pulled: PulledImage, timings: dict[str, float]) -> Tree:
        """Pass 1 (what is not scanned yet) and the merge: the planned tree."""
        t0 = time.monotonic()
        layer_scans = scan_layers(pulled, self._blobs, self.scans)
        tree = self.scans.merged(layer_scans)
        del layer_scans
        self.scans.clear()
        timings["flatten_scan_s"] = time.monotonic() - t0
        return tree

    def _erofs(self, pulled: PulledImage, timings: dict[str, float]) -> DiskInfo:
        """The merge's tree as an EROFS disk, bodies read from the cached blobs."""
        tree = self._merged(pulled, timings)
        disk = build_erofs(
            self._dest,
            tree,
            self._layer_opener(pulled),
            seed=pulled.resolved.digest,
            limits=self._limits,
            compute_sha256=self._options.disk_digest,
            report=self._report,
        )
        disk.timings.update(timings)
        return disk

    def _layer_opener(self, pulled: PulledImage) -> Callable[[int], BinaryIO]:
        """``open_layer(i)``: a fresh reader of layer ``i``'s uncompressed tar, from its blob."""
        layers, blobs = pulled.resolved.manifest.layers, self._blobs

        def layer(index: int) -> BinaryIO:
            return open_layer(blobs.path(layers[index].digest), layers[index])

        return layer

    def _emit(self, pulled: PulledImage, tree: Tree, out: BinaryIO) -> None:
        """Pass 2: the merged tree's stream, bodies copied from the cached blobs."""
        with counted(out, self._report, lambda: tree.stats.regular_bytes) as sink:
            write_tar(tree, self._layer_opener(pulled), sink, self._limits)

    def _report(self, done: int, total: int) -> None:
        # While the pull runs, the build says nothing: the image is "pulling".
        if self._pull.ended:
            self._reporter.converted(done, total)


class _Observer(PullObserver):
    """The pull as a conversion sees it: downloads go to the reporter, each layer's
    bytes to the one pass (``feeds``) and to pass 1 (the tap)."""

    def __init__(self, reporter: Reporter, scans: LayerScans, feeds: LayerFeeds | None) -> None:
        self._reporter = reporter
        self._scans = scans
        self.feeds = feeds

    def start(self, digest: Digest, size: int, cached: bool) -> None:
        self._reporter.start(digest, size, cached)

    def advance(self, digest: Digest, nbytes: int) -> None:
        self._reporter.advance(digest, nbytes)

    def done(self, digest: Digest) -> None:
        self._reporter.done(digest)

    def wants(self, index: int, layer: Descriptor) -> bool:
        return self._scans.wants(index, layer)

    def tap(self, index: int, layer: Descriptor, stream: BinaryIO) -> None:
        self._scans(index, layer, stream)
