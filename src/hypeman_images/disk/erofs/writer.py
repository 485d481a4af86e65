"""Write an EROFS image from a stream of entries: :class:`ErofsWriter`.

Layout of the image (``Documentation/filesystems/erofs.rst``, "On-disk
details"), all in 4 KiB blocks::

    block 0      the superblock at byte 1024 (with its checksum)
    data area    file bodies in the order they were added (see ``data``)
    outside      directory blocks and long symlink targets (see ``metadata``)
    xattr area   shared xattrs; ``xattr_blkaddr`` points here
    meta area    inode records; ``meta_blkaddr`` points here, nid = offset / 32

The data area is written as the bodies come; :meth:`ErofsWriter.finish`
lays out the rest (pure arithmetic), which fixes every superblock field, and
writes block 0 before the metadata: the image's head (block 0 and the data
area) is then final while the outside blocks, xattrs and inodes are still to
write, and a hash of the image can start on it (``on_head``; the build's
sha256 does, docs/design.md, "EROFS disks").

Same entries, same bodies, same seed: byte-identical image. The UUID comes
from the seed; ``build_time`` is the image's most common mtime
(:mod:`hypeman_images.disk.erofs.inodes` says why), nothing reads a clock.

Compression (lz4) is not done, but the shape leaves room for it: a file's
body arrives whole at :meth:`ErofsWriter.add`, so it could be cut into
4 KiB-aligned clusters, each compressed and appended to the data area, with
the cluster index (``struct z_erofs_map_header`` and lcluster indexes) kept
in memory as the block map of chunked files is now and written after the
inode as its ``extra``; the superblock would gain ``INCOMPAT_ZERO_PADDING``
and ``available_compr_algs``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, TypeVar

from hypeman_images.disk.erofs.checksum import crc32c_raw
from hypeman_images.disk.erofs.data import (
    Body,
    BodyReader,
    DataArea,
    chunk_bits,
    truncate,
    write_sparse,
)
from hypeman_images.disk.erofs.format import (
    BLOCK_BITS,
    BLOCK_SIZE,
    CHUNK_BASED,
    EXTENDED_SIZE,
    FLAT_INLINE,
    FLAT_PLAIN,
    INCOMPAT_CHUNKED_FILE,
    NULL_ADDR,
    SUPER_OFFSET,
    U16_MAX,
    encode_dev,
    pack_super,
)
from hypeman_images.disk.erofs.inodes import Node
from hypeman_images.disk.erofs.metadata import (
    build_time,
    check_size,
    meta_area,
    place_records,
    plan_dirs_and_links,
    share_xattrs,
    write_outside_blocks,
)
from hypeman_images.disk.erofs.model import (
    Entry,
    ErofsInputError,
    Kind,
    SparseMap,
    body_size,
    check_entry,
    split_path,
)
from hypeman_images.disk.erofs.xattrs import Stored, stored, worst_ibody_size
from hypeman_images.oci.digest import Digest

_UUID_NAMESPACE = uuid.UUID("6f1d3b1e-8c43-5a4e-9a4f-6879706d616e")
DEFAULT_INLINE_BUDGET = 128 << 20
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Placed:
    """Where :meth:`ErofsWriter.place` put a regular file's body, for :meth:`ErofsWriter.add`.

    ``i_u`` is the first block (flat) or the chunk bits (chunked), ``extra`` the
    inline tail or the chunk map; ``size``, ``sparse`` and ``xattrs`` are the
    entry's it was placed for (the inline tail was chosen for those xattrs).
    """

    size: int
    sparse: SparseMap | None
    xattrs: tuple[Stored, ...]
    datalayout: int
    i_u: int
    extra: bytes


@dataclass(frozen=True)
class ErofsResult:
    """What :meth:`ErofsWriter.finish` wrote: the image's size and inode count."""

    size: int
    blocks: int
    inodes: int
    uuid: uuid.UUID
    build_time: int


class ErofsWriter:
    """Build an EROFS image in ``out`` (a seekable binary file, from offset 0).

    :meth:`add` each entry, parents before children, the root (``b""``) first;
    a regular file's body streams straight into the data area. :meth:`finish`
    lays out the metadata, writes the superblock, then the metadata. Small
    file tails wait in memory to go inline, up to ``inline_budget`` bytes in
    all; past that they take a block of their own (still deterministic: it
    depends on the entries alone). Raises :class:`ErofsInputError` for input
    the format cannot hold, :class:`StorageError` when the output cannot be
    written; nothing is written outside ``out``.
    """

    def __init__(
        self, out: BinaryIO, seed: Digest, *, inline_budget: int = DEFAULT_INLINE_BUDGET
    ) -> None:
        self._out = out
        self._seed = seed
        self._area = DataArea(out, BLOCK_SIZE)
        self._nodes: list[Node] = []
        self._paths: dict[bytes, Node] = {}
        self._budget = inline_budget
        self._chunked = False
        self._done = False

    def add(self, entry: Entry, body: Body | None = None, *, placed: Placed | None = None) -> None:
        """Add one path; ``body`` is a regular file's content (a file object or chunks).

        Or ``placed``: the body :meth:`place` wrote already, for an entry of the
        same size, sparse map and xattrs. After an error the writer is spent:
        the image is incomplete, and :meth:`add`, :meth:`place` and
        :meth:`finish` refuse to go on.
        """
        self._spent_on_error(self._add, entry, body, placed)

    def place(self, entry: Entry, body: Body) -> Placed:
        """Write regular file ``entry``'s body into the data area now; :meth:`add` it later.

        For a caller that has the bodies before it knows the tree (the one
        pass: the data first, the inodes when the stream is over). The image
        holds the body's blocks whether or not the entry is ever added. Bodies
        placed in the same order as :meth:`add` would write them give the same
        image, byte for byte.
        """
        return self._spent_on_error(self._place_new, entry, body)

    def _spent_on_error(self, step: Callable[..., _T], *args: object) -> _T:
        if self._done:
            raise ErofsInputError("erofs: the writer has finished or failed")
        try:
            return step(*args)
        except BaseException:
            self.abandon()
            raise

    def _place_new(self, entry: Entry, body: Body) -> Placed:
        check_entry(entry)
        where = f"erofs: {entry.path!r}"
        if entry.kind is not Kind.FILE:
            raise ErofsInputError(f"{where}: only a regular file has a body")
        return self._place(entry, body, stored(entry.xattrs, where), where)

    def _add(self, entry: Entry, body: Body | None, placed: Placed | None) -> None:
        check_entry(entry)
        where = f"erofs: {entry.path!r}"
        if (body is not None or placed is not None) and entry.kind is not Kind.FILE:
            raise ErofsInputError(f"{where}: only a regular file has a body")
        if body is not None and placed is not None:
            raise ErofsInputError(f"{where}: a body and a placed body")
        if entry.path in self._paths:
            raise ErofsInputError(f"{where}: added twice")
        if entry.path == b"":
            if entry.kind is not Kind.DIR or self._nodes:
                raise ErofsInputError("erofs: the root must be the first entry, a directory")
            self._paths[b""] = self._new(entry)
            return
        parent_path, name = split_path(entry.path)
        parent = self._paths.get(parent_path)
        if parent is None or parent.children is None:
            raise ErofsInputError(f"{where}: its parent is not an earlier directory")
        node = self._link(entry, where) if entry.kind is Kind.HARDLINK else self._new(entry)
        if node.kind is Kind.DIR:
            node.parent = parent
            parent.nlink += 1
        elif node.kind is Kind.FILE and entry.kind is Kind.FILE:
            if placed is None:
                placed = self._place(entry, body if body is not None else (), node.xattrs, where)
            _attach(node, entry, placed, where)
        parent.children[name] = node
        self._paths[entry.path] = node

    def _new(self, entry: Entry) -> Node:
        where = f"erofs: {entry.path!r}"
        node = Node(
            kind=entry.kind,
            mode=entry.mode,
            uid=entry.uid,
            gid=entry.gid,
            mtime=entry.mtime,
            mtime_nsec=entry.mtime_nsec,
            ino=len(self._nodes) + 1,
            xattrs=stored(entry.xattrs, where),
        )
        if entry.kind is Kind.DIR:
            node.children, node.nlink = {}, 2
        elif entry.kind is Kind.SYMLINK:
            node.extra, node.size = entry.target, len(entry.target)
        elif entry.kind in (Kind.CHAR, Kind.BLOCK):
            node.i_u = encode_dev(entry.devmajor, entry.devminor)
        self._nodes.append(node)
        return node

    def _link(self, entry: Entry, where: str) -> Node:
        target = self._paths.get(entry.target)
        if target is None or target.kind is Kind.DIR:
            raise ErofsInputError(f"{where}: hard link to {entry.target!r}, not an earlier file")
        target.nlink += 1
        return target

    def _place(self, entry: Entry, body: Body, xattrs: tuple[Stored, ...], where: str) -> Placed:
        size = entry.size
        reader = BodyReader(body, body_size(entry), where)
        sparse = entry.sparse
        if sparse is not None and size and not _dense(sparse, size):
            bits = chunk_bits(sparse, size)
            shift = BLOCK_BITS + bits
            addrs = write_sparse(reader, sparse, size, shift, self._area)
            count = -(-size >> shift)
            extra = b"".join(addrs.get(i, NULL_ADDR).to_bytes(4, "little") for i in range(count))
            placed = Placed(size, sparse, xattrs, CHUNK_BASED, bits, extra)
            self._chunked = True
        else:
            tail = size % BLOCK_SIZE
            inline = tail and EXTENDED_SIZE + worst_ibody_size(xattrs) + tail <= BLOCK_SIZE
            inline = inline and tail <= self._budget
            full = size - tail if inline else size
            first = self._area.block if full else 0
            reader.copy(full, self._area)
            self._area.pad_block()
            extra = b""
            if inline:
                extra = reader.take(tail)
                self._budget -= tail
            placed = Placed(
                size, sparse, xattrs, FLAT_INLINE if inline else FLAT_PLAIN, first, extra
            )
        reader.close()
        return placed

    def abandon(self) -> None:
        """Stop without an image (the caller failed): end the writing thread."""
        self._done = True
        self._area.close()

    def finish(self, *, on_head: Callable[[int], None] | None = None) -> ErofsResult:
        """Write the superblock, directories, xattrs and inodes; the image is complete.

        ``on_head(n)`` is called before the metadata is written, once the
        first ``n`` bytes of ``out`` are final: the superblock's block and the
        data area are in the file (at least ``n`` bytes long, a trailing hole
        reading as zeros) and are not written again. A hash of the image can
        start there while the writer goes on (``disk.filehash``).
        """
        if self._done or not self._nodes:
            raise ErofsInputError("erofs: finish after finish or a failure, or with no root")
        self._done = True
        try:
            return self._finish(on_head)
        finally:
            self._area.close()

    def _finish(self, on_head: Callable[[int], None] | None) -> ErofsResult:
        nodes = self._nodes
        build = build_time(nodes)
        shared = share_xattrs(nodes)
        area = self._area
        outside = plan_dirs_and_links(nodes, build, area.block)
        xattr_blkaddr = area.block + outside
        meta_blkaddr = xattr_blkaddr + -(-len(shared.area) // BLOCK_SIZE)
        meta_blocks = place_records(nodes, build)
        blocks = meta_blkaddr + meta_blocks
        check_size(blocks)
        root_nid = nodes[0].nid
        assert root_nid <= U16_MAX
        fs_uuid = uuid.uuid5(_UUID_NAMESPACE, f"erofs-uuid:{self._seed}")
        sb = pack_super(
            root_nid=root_nid,
            inos=len(nodes),
            build_time=build[0],
            build_time_nsec=build[1],
            blocks=blocks,
            meta_blkaddr=meta_blkaddr,
            xattr_blkaddr=xattr_blkaddr,
            uuid=fs_uuid.bytes,
            feature_incompat=INCOMPAT_CHUNKED_FILE if self._chunked else 0,
        )
        # The layout alone fixes the superblock, so block 0 goes first: with the
        # data area before it, the image's head is final while the metadata is
        # still to write (docs/design.md, "EROFS disks").
        area.write_at(0, _super_block(sb))
        if on_head is not None:
            head = area.pos
            area.flush()
            truncate(self._out, head)  # the data area may end in a hole, past the file's end
            on_head(head)
        write_outside_blocks(nodes, area)
        area.write(shared.area)
        area.pad_block()
        assert area.block == meta_blkaddr
        area.write(meta_area(nodes, build, shared, meta_blocks))
        area.flush()
        truncate(self._out, blocks * BLOCK_SIZE)
        return ErofsResult(blocks * BLOCK_SIZE, blocks, len(nodes), fs_uuid, build[0])


def _super_block(sb: bytes) -> bytes:
    """Block 0: zeros, the superblock at 1024, its crc32c over the rest of the block."""
    block = bytearray(BLOCK_SIZE)
    block[SUPER_OFFSET : SUPER_OFFSET + len(sb)] = sb
    crc = crc32c_raw(bytes(block[SUPER_OFFSET:]))
    block[SUPER_OFFSET + 4 : SUPER_OFFSET + 8] = crc.to_bytes(4, "little")
    return bytes(block)


def _attach(node: Node, entry: Entry, placed: Placed, where: str) -> None:
    """Give a regular file's inode the body :meth:`ErofsWriter.place` wrote."""
    if (entry.size, entry.sparse, node.xattrs) != (placed.size, placed.sparse, placed.xattrs):
        raise ErofsInputError(f"{where}: its body was placed for another size, map or xattrs")
    node.size = placed.size
    node.datalayout, node.i_u, node.extra = placed.datalayout, placed.i_u, placed.extra


def _dense(sparse: SparseMap, size: int) -> bool:
    """Whether a sparse map covers the whole file (its body is then the plain content)."""
    end = 0
    for offset, length in sparse:
        if length and offset != end:
            return False
        end = offset + length if length else end
    return end == size
