"""The EROFS one pass: the bodies into the image while the layers download, the inodes after.

:class:`onepass.OnePass` runs :class:`layers.onepass.TopDown` -- the layers
read top first as they download, each inflated once -- into
:class:`ErofsBodies`: each surviving body goes into the image's data area as
it inflates, in large sequential writes (:meth:`ErofsWriter.place`), and
where it went is kept by (layer, ordinal). EROFS allows it: nothing points
at a body but its inode, and the superblock, written once the tree is laid
out, says where the inodes and xattrs are
(``Documentation/filesystems/erofs.rst``, "On-disk details"); the writer
puts them after the data. Once the stream is over and the pull has verified
every blob, the merge plans the tree from the scans the pass made,
:meth:`TopDown.check` proves the stream made that very tree, and the writer
adds the merge's inodes, directories and xattrs in the two-pass order
(:func:`build.erofs.tree_entries`), each regular file with the body placed
for it.

**The same bytes as the two passes.** Both lay the data out top layer first,
each layer's files in tar order (:func:`build.erofs.files_top_first`), and
add the same inodes in the same order. One exception: a layer that names a
regular file's path twice (or replaces the file within the layer) had its
first body written before the second was seen; its blocks stay in the data
area, unreferenced, so that image is larger than the two passes' and its
later blocks sit elsewhere. It is reproducible all the same: the pass reads
the layers one after another, so what it writes depends on the layers, never
on when their bytes arrived (``tests/build/test_erofs_onepass.py``).

It falls back (:class:`Speculation`) where the ext4 one pass does, and when
the writer refuses an entry: the two passes then refuse it with their own
message, so a refusal reads the same whichever way was tried first.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from hypeman_images.build.erofs import Progress, entry_at, publish_erofs, tree_entries
from hypeman_images.build.onepass import OnePass
from hypeman_images.build.stream import DiskInfo
from hypeman_images.disk.erofs import ErofsInputError, ErofsResult, ErofsWriter, Placed
from hypeman_images.fsutil import writeback_thread
from hypeman_images.layers.entries import Entry, sparse_map
from hypeman_images.layers.onepass import Speculation
from hypeman_images.layers.plan import Tree
from hypeman_images.layers.tarread import TarReader
from hypeman_images.oci.digest import Digest


class ErofsBodies:
    """The survivors (:class:`layers.survivors.Survivors`) as the EROFS writer takes them first.

    Bodies only, placed in the data area as they come; the paths are the
    merge's, added once the pass is proven. :attr:`placed` maps (layer,
    ordinal) to where each body went.
    """

    def __init__(self, writer: ErofsWriter, progress: Progress) -> None:
        self._writer = writer
        self._progress = progress
        self.placed: dict[tuple[int, int], Placed] = {}

    def entry(self, entry: Entry, path: bytes, link_to: bytes | None = None) -> None:
        """Nothing yet: the inodes come from the merge's tree."""

    def body(self, entry: Entry, layer: int, reader: TarReader, *, seek: bool) -> None:
        """Write ``entry``'s body into the data area as it inflates."""
        sparse = sparse_map(entry)
        chunks = reader.body_at(entry.offset, entry.size, sparse) if seek else reader.body()
        try:
            placed = self._writer.place(entry_at(entry, entry.path), chunks)
        except ErofsInputError as exc:
            raise Speculation(f"layer {layer}: the EROFS writer refuses it: {exc}") from exc
        self.placed[layer, entry.ordinal] = placed
        self._progress.add(entry.size)

    def end(self) -> None:
        """Nothing: the end of the stream is the caller's to act on."""


def build_erofs_one_pass(
    dest: Path,
    one_pass: OnePass,
    *,
    seed: Digest,
    compute_sha256: bool,
    report: Callable[[int, int], None] | None = None,
) -> DiskInfo:
    """Make the EROFS disk ``dest`` in one pass, atomically; ``report(done, total)``: bodies.

    Raises :class:`Speculation` to fall back to the two passes (the temp disk
    is removed then), else what the pass and :func:`build.erofs.publish_erofs`
    raise.
    """

    def write(
        out: BinaryIO, timings: dict[str, float], on_head: Callable[[int], None] | None
    ) -> ErofsResult:
        t0 = time.monotonic()
        writer = ErofsWriter(out, seed)
        try:
            with writeback_thread(out.fileno(), "erofs-writeback") as writeback:
                bodies = ErofsBodies(writer, Progress(writeback, one_pass.total, report))
                tree = one_pass.proven(bodies)
            timings["one_pass_s"] = time.monotonic() - t0
            t0 = time.monotonic()
            _add_tree(writer, tree, bodies.placed)
            del tree, bodies
            result = writer.finish(on_head=on_head)
        except ErofsInputError as exc:
            raise Speculation(f"the EROFS writer refuses the tree: {exc}") from exc
        except BaseException:
            writer.abandon()
            raise
        timings["erofs_s"] = time.monotonic() - t0
        return result

    return publish_erofs(dest, write, compute_sha256=compute_sha256, one_pass=True)


def _add_tree(writer: ErofsWriter, tree: Tree, placed: dict[tuple[int, int], Placed]) -> None:
    """Every path of the merge's tree, each regular file with the body placed for it."""
    for entry, node in tree_entries(tree):
        if node is None or not node.entry.size:
            writer.add(entry)
            continue
        where = placed.pop((node.layer, node.entry.ordinal), None)
        if where is None:  # check() proved every file was written: a bug if it was not
            raise Speculation(f"{entry.path!r}: no body was placed for layer {node.layer}'s file")
        writer.add(entry, placed=where)
