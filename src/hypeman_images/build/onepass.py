"""The one-pass way of :mod:`convert`: the disk written while the layers download.

Whether an image tries it is known from the manifest alone
(:func:`oneplan.one_pass_candidate`), and so is the disk's size
(:func:`oneplan.one_pass_sizes`): the pass starts before any layer is read.
:class:`OnePass` runs :class:`layers.onepass.TopDown` into mke2fs, reading
each layer through the feeds that follow its download (:mod:`store.feeds`),
and finishes the disk only once the pull verified every blob
(:class:`PullEnd`). It raises :class:`Speculation` or :class:`OutOfRoom`
whenever it cannot prove it made the merge's tree; the conversion then takes
the two-pass way.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from hypeman_images.build.oneplan import one_pass_sizes
from hypeman_images.build.options import BuildOptions
from hypeman_images.build.pull import PulledImage
from hypeman_images.build.stream import DiskInfo, counted, disk_info, open_layer, size_inputs
from hypeman_images.disk.e2fsprogs import E2fsprogs
from hypeman_images.disk.mke2fs import build_disk_one_pass
from hypeman_images.disk.sizing import SizeInputs
from hypeman_images.layers.compression import Hasher, sniff
from hypeman_images.layers.entries import LayerScan
from hypeman_images.layers.limits import Limits
from hypeman_images.layers.merge import merge
from hypeman_images.layers.onepass import TopDown
from hypeman_images.layers.plan import Tree
from hypeman_images.layers.survivors import Survivors, TarStream
from hypeman_images.oci.spec import LAYER_COMPRESSION, Descriptor
from hypeman_images.store.blobs import BlobStore
from hypeman_images.store.feeds import BlobEnds, FeedAborted, LayerFeeds


def uncompressed_size(path: Path, layer: Descriptor) -> int | None:
    """The layer's uncompressed size from its cached blob alone; ``None`` if it does not say.

    Only for the progress shown (the disk is sized by :func:`oneplan.one_pass_sizes`).
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


class PullEnd:
    """The end of the pull that a one pass follows, said once by the build's thread.

    The feeds' bytes are unverified until the pull returns (:mod:`store.feeds`):
    nothing of a pull that failed may become a disk.
    """

    def __init__(self) -> None:
        self._ended = threading.Event()
        self._error: BaseException | None = None

    def set(self, error: BaseException | None = None) -> None:
        """The pull returned, or failed with ``error``."""
        self._error = error
        self._ended.set()

    @property
    def ended(self) -> bool:
        """Has the pull returned (either way)?"""
        return self._ended.is_set()

    def wait(self) -> None:
        """Wait for the pull; raise :class:`FeedAborted` if it failed."""
        self._ended.wait()
        if self._error is not None:
            raise FeedAborted(f"the pull failed: {self._error}")


class OnePass:
    """One try of the one-pass way for ``pulled``, reading its layers through ``feeds``.

    ``known``: layers whose scans were made before (the scan cache), by
    index: they are neither parsed nor hashed again. :meth:`build` makes the
    disk or raises :class:`Speculation` or :class:`OutOfRoom`; :attr:`made`
    then holds the scans of a stream written whole, for the two-pass way.
    ``report(done, total)``: the tar bytes written so far.
    """

    def __init__(
        self,
        pulled: PulledImage,
        *,
        blobs: BlobStore,
        feeds: LayerFeeds,
        pull: PullEnd,
        limits: Limits,
        known: dict[int, LayerScan],
        report: Callable[[int, int], None],
    ) -> None:
        self._pulled = pulled
        self._blobs = blobs
        self._feeds = feeds
        self._pull = pull
        self._limits = limits
        self._report = report
        self._layers = pulled.resolved.manifest.layers
        self._sizes = one_pass_sizes(self._layers, limits)
        self._bound = sum(self._sizes)  # the most tar the layers may hold: the disk's sizing
        self._top = TopDown(
            self._open,
            [str(layer.digest) for layer in self._layers],
            limits,
            known,
            dict(enumerate(self._sizes)),
            # Without it a decompression bomb is found out only once the pass has
            # written the disk's worth into mke2fs before falling back to the two passes.
            stated=self._stated,
        )
        self._tar_bytes: int | None = None
        self._merging = ThreadPoolExecutor(1, thread_name_prefix="merge")
        self._planned: Future[Tree] | None = None
        self.made: list[LayerScan] = []

    def build(self, dest: Path, options: BuildOptions, tools: E2fsprogs) -> DiskInfo:
        """Make ``dest`` in one pass; the merge thread is done when this returns."""
        t0 = time.monotonic()
        try:
            result = build_disk_one_pass(
                dest,
                self._bound,
                self._write,
                self._plan,
                self._prove,
                seed=self._pulled.resolved.digest,
                free_space=options.free_space,
                mke2fs=tools,
                compute_sha256=options.disk_digest,
            )
        finally:
            self._merging.shutdown(wait=True)
        return disk_info(result, {"one_pass_s": time.monotonic() - t0}, one_pass=True)

    def _open(self, index: int, hasher: Hasher | None) -> BinaryIO:
        layer = self._layers[index]
        return open_layer(self._feeds.open(layer.digest), layer, hasher)

    def _stated(self, index: int) -> int | None:
        """The least layer ``index`` inflates to, as its whole blob says (0 if it says
        nothing); ``None`` while it downloads."""
        layer = self._layers[index]
        ends = self._feeds.ends(layer.digest)
        return (_stated_size(ends, layer) or 0) if ends is not None else None

    def _expect(self, scan: LayerScan) -> None:
        scan.check_diff_id(self._pulled.config.diff_ids[scan.index])

    def proven(self, survivors: Survivors) -> Tree:
        """Run the pass into ``survivors``; the merge's tree once proven to be the stream's.

        For a disk that builds its tree after the stream (EROFS): waits for the
        pull's end, merges the scans the pass made and raises
        :class:`Speculation` unless the stream made exactly that tree.
        """
        made = self._top.run(survivors, self._expect)
        self._pull.wait()  # nothing of a pull that failed may become a disk
        self.made = made
        tree = merge(made, self._limits)
        self._top.check(tree)
        self._top.forget()
        return tree

    def total(self) -> int:
        """The tar bytes the layers hold, for the progress shown (see :meth:`_total`)."""
        return self._total()

    def _total(self) -> int:
        # The layers' real size once their blobs are all cached (gzip's trailers),
        # for the progress shown; till then the bound the disk was sized for.
        if not self._pull.ended:
            return self._bound  # nothing is shown while the pull runs: no trailer to read
        if self._tar_bytes is None:
            paths = [(self._blobs.path(layer.digest), layer) for layer in self._layers]
            found = [uncompressed_size(path, layer) for path, layer in paths]
            if None in found:
                return self._bound
            self._tar_bytes = sum(size or 0 for size in found)
        return self._tar_bytes

    def _write(self, out: BinaryIO) -> None:
        with counted(out, self._report, self._total) as sink:
            made = self._top.run(TarStream(sink), self._expect)
            # Nothing of a pull that failed may become a disk; mke2fs waits for
            # the end of its stream meanwhile.
            self._pull.wait()
        self.made = made

    def _plan(self) -> tuple[SizeInputs, list[tuple[bytes, str, bytes]]]:
        stats, fixups = self._top.planned()
        # The merge the proof needs runs while the disk is shrunk and hashed;
        # started after the count, not beside it, as both want the GIL.
        self._planned = self._merging.submit(merge, self.made, self._limits)
        return size_inputs(stats), [(f.path, f.name, f.value) for f in fixups]

    def _prove(self) -> None:
        assert self._planned is not None, "prove() before plan()"
        self._top.check(self._planned.result())
