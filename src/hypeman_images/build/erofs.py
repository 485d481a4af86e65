"""The merged tree as an EROFS disk: the adapter from ``layers`` to ``disk.erofs``, and the build.

``disk`` may not import ``layers`` (docs/design.md, "Layout"), so the two
meet here. :func:`erofs_entries` walks a planned :class:`~layers.plan.Tree`
in the order :func:`layers.emit.write_tar` writes it -- every directory
(root first, parents before children), then symlinks, devices and fifos,
then, layer by layer, each surviving regular file with its body read
straight from its layer at the offset pass 1 recorded, each node followed by
its other paths as hard links -- which is the order the writer wants
(parents first, a hard link's target before the link). Nothing is staged on
the host and no tar is written again: a body goes from the inflating layer
into the image's data area.

:func:`build_erofs` writes the image to a temp file beside ``dest`` (seeded
by the image digest, so the same tree gives the same bytes), checks it with
``fsck.erofs`` beside its sha256 when erofs-utils is installed, and renames it
into place (:mod:`hypeman_images.disk.publish`).

What reaches the disk is what the ext4 path makes: the same limits and
refusals (the merge applies them), the xattr policy's kept xattrs
(:data:`layers.xattrs.XATTR_POLICY`; EROFS stores every kept namespace
itself, with no fix-up pass), whole-second mtimes as the tar stream carries
them, and sparse files with their holes left as holes.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from hypeman_images import __version__
from hypeman_images.build.stream import DiskInfo
from hypeman_images.disk.erofs import Body, Entry, ErofsResult, Kind, write_erofs
from hypeman_images.disk.filehash import FileHash
from hypeman_images.disk.fsck_erofs import check_and_hash, find_fsck_erofs
from hypeman_images.disk.publish import commit, temp_disk
from hypeman_images.errors import ToolError
from hypeman_images.fsutil import WritebackRequest, writeback_thread
from hypeman_images.layers import entries as layer
from hypeman_images.layers.limits import Limits
from hypeman_images.layers.plan import Node, Tree
from hypeman_images.layers.tarread import TarReader
from hypeman_images.layers.xattrs import XattrAction, xattr_action
from hypeman_images.oci.digest import Digest

log = logging.getLogger(__name__)

_KIND = {
    layer.Kind.FILE: Kind.FILE,
    layer.Kind.DIR: Kind.DIR,
    layer.Kind.SYMLINK: Kind.SYMLINK,
    layer.Kind.CHAR: Kind.CHAR,
    layer.Kind.BLOCK: Kind.BLOCK,
    layer.Kind.FIFO: Kind.FIFO,
}
_WRITEBACK_EVERY = 32 << 20  # start the device writes this often (fsutil.start_writeback)
_REPORT_EVERY = 4 << 20


def erofs_entry(node: Node) -> Entry:
    """The writer's entry for ``node``'s primary path: its kind, metadata and kept xattrs."""
    return entry_at(node.entry, node.primary)


def entry_at(e: layer.Entry, path: bytes) -> Entry:
    """The writer's entry for layer entry ``e`` at ``path``."""
    kind = _KIND[e.kind]
    device = kind in (Kind.CHAR, Kind.BLOCK)
    return Entry(
        path=path,
        kind=kind,
        mode=e.mode & 0o7777,  # the kind gives the file type
        uid=e.uid,
        gid=e.gid,
        mtime=e.mtime,
        size=e.size if kind is Kind.FILE else 0,
        target=e.target if kind is Kind.SYMLINK else b"",
        devmajor=e.devmajor if device else 0,
        devminor=e.devminor if device else 0,
        xattrs=_kept(e.xattrs) if e.xattrs else (),
        sparse=layer.sparse_map(e),
    )


def _kept(xattrs: tuple[tuple[str, bytes], ...]) -> tuple[tuple[bytes, bytes], ...]:
    """The xattrs the policy keeps, names encoded back as the tar reader decoded them."""
    return tuple(
        (name.encode("utf-8", "surrogateescape"), value)
        for name, value in xattrs
        if xattr_action(name) is not XattrAction.DROP
    )


def _links(node: Node) -> Iterator[tuple[Entry, None]]:
    for path in node.paths[1:]:
        yield Entry(path=path, kind=Kind.HARDLINK, target=node.primary), None


def tree_entries(tree: Tree) -> Iterator[tuple[Entry, Node | None]]:
    """Every path of ``tree`` in the writer's order, with the node whose body follows.

    Every directory (root first, parents before children), then symlinks,
    devices and fifos, then the regular files (:func:`files_top_first`), each
    node followed by its other paths as hard links. The node is given for a
    regular file's primary path (with a body if its size is not 0), else
    ``None``.
    """
    for node in tree.directories:
        yield erofs_entry(node), None
    for node in tree.specials:
        yield erofs_entry(node), None
        yield from _links(node)
    for _, nodes in files_top_first(tree):
        for node in nodes:
            yield erofs_entry(node), node
            yield from _links(node)


def files_top_first(tree: Tree) -> list[tuple[int, list[Node]]]:
    """The tree's regular files by layer, top layer first, each layer's in tar order.

    The order in which the one pass meets their bodies (``build.onepass_erofs``),
    so that both ways lay the data area out alike.
    """
    by_layer: dict[int, list[Node]] = {}
    for node in tree.files:  # by (layer, ordinal): Tree's docstring
        by_layer.setdefault(node.layer, []).append(node)
    return sorted(by_layer.items(), key=lambda item: -item[0])


def erofs_entries(
    tree: Tree, open_layer: Callable[[int], BinaryIO], limits: Limits | None = None
) -> Iterator[tuple[Entry, Body | None]]:
    """Every path of ``tree`` as the writer takes it, bodies read from ``open_layer(i)``.

    ``open_layer(i)`` returns a fresh reader of layer ``i``'s uncompressed
    tar (the bytes pass 1 scanned); as in :func:`layers.emit.write_tar`, it is
    called at most once per layer, only for a layer that still provides a
    non-empty file, and each is read up to its last needed body. A body must
    be read whole before the next entry is taken (the writer does).
    """
    bodies = _LayerBodies(open_layer, limits or Limits())
    try:
        for entry, node in tree_entries(tree):
            yield entry, bodies.of(node) if node is not None and node.entry.size else None
    finally:
        bodies.close()


class _LayerBodies:
    """Bodies read from one layer at a time, each layer opened once (files come by layer)."""

    def __init__(self, open_layer: Callable[[int], BinaryIO], limits: Limits) -> None:
        self._open = open_layer
        self._limits = limits
        self._index = -1
        self._stream: BinaryIO | None = None
        self._reader: TarReader | None = None

    def of(self, node: Node) -> Body:
        """``node``'s body, at the offset pass 1 recorded in its layer."""
        if self._reader is None or node.layer != self._index:
            self.close()
            self._index, self._stream = node.layer, self._open(node.layer)
            self._reader = TarReader(
                self._stream,
                where=f"layer {node.layer}",
                max_bytes=self._limits.max_layer_bytes,
                max_header_bytes=self._limits.max_header_bytes,
                hash_stream=False,
            )
        e = node.entry
        return self._reader.body_at(e.offset, e.size, layer.sparse_map(e))

    def close(self) -> None:
        """Close the layer being read."""
        if self._stream is not None:
            self._stream.close()
        self._stream = self._reader = None


class Progress:
    """Counts the body bytes going by: reports them, and starts the device's writes.

    ``total()``: the bytes the bodies come to, for the progress shown;
    ``writeback``: a :func:`fsutil.writeback_thread`'s requests, on the image.
    """

    def __init__(
        self,
        writeback: WritebackRequest,
        total: Callable[[], int],
        report: Callable[[int, int], None] | None,
    ) -> None:
        self._writeback = writeback
        self._total = total
        self._report = report
        self._done = self._reported = self._written_back = 0

    def add(self, nbytes: int) -> None:
        """``nbytes`` more of the bodies are with the writer."""
        self._done += nbytes
        if self._done - self._written_back >= _WRITEBACK_EVERY:
            self._written_back = self._done
            self._writeback(0, 0)  # what the writer's thread wrote so far
        if self._report is not None and self._done - self._reported >= _REPORT_EVERY:
            self._reported = self._done
            total = max(1, self._total())
            self._report(min(self._done, total), total)

    def bodies(
        self, entries: Iterable[tuple[Entry, Body | None]]
    ) -> Iterator[tuple[Entry, Body | None]]:
        """``entries`` passed on; each body is counted once the writer has taken it."""
        for entry, body in entries:
            yield entry, body
            if body is not None:
                self.add(entry.size)


# Writes the image to the open temp file and returns what the writer made,
# passing the third argument (None when no sha256 is asked for) to
# ErofsWriter.finish as ``on_head``; may add to the timings.
WriteImage = Callable[[BinaryIO, dict[str, float], Callable[[int], None] | None], ErofsResult]


def publish_erofs(
    dest: Path, write: WriteImage, *, compute_sha256: bool, one_pass: bool
) -> DiskInfo:
    """``write`` the image to a temp file beside ``dest``, check it, hash it, rename it.

    The sha256 starts on the image's head while the writer writes the
    metadata (:class:`~hypeman_images.disk.filehash.FileHash`), and ends
    beside ``fsck.erofs``. Raises what ``write`` raises, :class:`ToolError`
    when ``fsck.erofs`` finds the new disk unclean, and
    :class:`~hypeman_images.errors.StorageError`; the hashing thread is
    stopped and the temp disk removed then.
    """
    timings: dict[str, float] = {}
    with (
        # Looked for beside the writing, not before it: searching PATH and running
        # `fsck.erofs -V` take tens of milliseconds on a cold host.
        ThreadPoolExecutor(1, thread_name_prefix="fsck.erofs-probe") as probe,
        temp_disk(dest) as tmp,
        contextlib.closing(FileHash(tmp))
        if compute_sha256
        else contextlib.nullcontext() as hashing,
    ):
        found = probe.submit(find_fsck_erofs)
        with tmp.open("r+b") as out:
            result = write(out, timings, hashing.grow if hashing is not None else None)
        tool = found.result()
        if tool is None:
            log.info("fsck.erofs not found (erofs-utils): the new EROFS disk is not checked")
        t0 = time.monotonic()
        digest, findings = check_and_hash(tool, tmp, compute_sha256=compute_sha256, hashing=hashing)
        if findings is not None:
            raise ToolError(f"fsck.erofs found problems in the new disk {findings}")
        commit(tmp, dest)
        timings["check_s"] = time.monotonic() - t0
    return DiskInfo(
        path=dest,
        size_bytes=result.size,
        content_bytes=result.size,  # a read-only image has no free space
        sha256=str(digest) if digest is not None else None,
        tool_versions={"hypeman-images": __version__},
        fallback_used=False,
        timings=timings,
        one_pass=one_pass,
    )


def build_erofs(
    dest: Path,
    tree: Tree,
    open_layer: Callable[[int], BinaryIO],
    *,
    seed: Digest,
    limits: Limits,
    compute_sha256: bool = True,
    report: Callable[[int, int], None] | None = None,
) -> DiskInfo:
    """Write ``tree`` as an EROFS disk at ``dest``, atomically; what was made.

    Raises what the writer raises for a tree the format cannot hold
    (:class:`~hypeman_images.disk.erofs.ErofsInputError`, a ``LayerError``),
    and what :func:`publish_erofs` raises.
    """
    total = tree.stats.regular_bytes

    def write(
        out: BinaryIO, timings: dict[str, float], on_head: Callable[[int], None] | None
    ) -> ErofsResult:
        t0 = time.monotonic()
        with writeback_thread(out.fileno(), "erofs-writeback") as writeback:
            progress = Progress(writeback, lambda: total, report)
            entries = progress.bodies(erofs_entries(tree, open_layer, limits))
            result = write_erofs(entries, out, seed, on_head=on_head)
        timings["erofs_s"] = time.monotonic() - t0
        return result

    disk = publish_erofs(dest, write, compute_sha256=compute_sha256, one_pass=False)
    if report is not None:
        report(total, max(1, total))
    return disk


__all__ = [
    "Progress",
    "build_erofs",
    "entry_at",
    "erofs_entries",
    "erofs_entry",
    "files_top_first",
    "publish_erofs",
    "tree_entries",
]
