"""The end of a build: directories, symlinks, shared xattrs and inodes laid out.

After the data area the writer appends, in order: the blocks of directories
and symlinks that do not fit inline, the shared xattr area
(``xattr_blkaddr``) and the metadata area (``meta_blkaddr``) holding every
inode's record. Directory blocks name their children by nid, so the records
are placed first (pure arithmetic) and written last.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from hypeman_images.disk.erofs.data import DataArea
from hypeman_images.disk.erofs.dirs import encode_block, plan
from hypeman_images.disk.erofs.format import (
    BLOCK_SIZE,
    FLAT_INLINE,
    FLAT_PLAIN,
    FT_DIR,
    SLOT_SIZE,
)
from hypeman_images.disk.erofs.inodes import Node
from hypeman_images.disk.erofs.layout import MetaSpace
from hypeman_images.disk.erofs.model import ErofsInputError, Kind
from hypeman_images.disk.erofs.xattrs import SharedXattrs

BuildTime = tuple[int, int]


def build_time(nodes: list[Node]) -> BuildTime:
    """The most common (mtime, nsec) of the inodes; the smallest among equals."""
    counts = Counter((n.mtime, n.mtime_nsec) for n in nodes)
    top = max(counts.values())
    return min(t for t, c in counts.items() if c == top)


def share_xattrs(nodes: list[Node]) -> SharedXattrs:
    """Choose the shared xattrs and note each inode's inline xattr size."""
    shared = SharedXattrs()
    for node in nodes:
        shared.count(node.xattrs)
    shared.seal()
    for node in nodes:
        node.xattr_size = shared.ibody_size(node.xattrs)
    return shared


def plan_dirs_and_links(nodes: list[Node], build: BuildTime, first_block: int) -> int:
    """Lay out directories and symlinks; returns the blocks they need outside the records.

    A directory's last block and a symlink's target go inline when the record
    still fits one block; otherwise they get blocks from ``first_block`` on.
    """
    block = first_block
    for node in nodes:
        if node.kind is Kind.DIR:
            assert node.children is not None
            layout = plan([b".", b"..", *node.children])
            node.dir_layout, node.size = layout, layout.size
            tail = layout.tail
            node.extra = bytes(tail)  # a stand-in of the tail's length until nids are known
            inline = tail < BLOCK_SIZE and node.record_size(build) <= BLOCK_SIZE
            if not inline:
                node.extra = b""
            full = len(layout.blocks) - (1 if inline else 0)
            node.datalayout = FLAT_INLINE if inline else FLAT_PLAIN
            node.i_u = block if full else 0
            block += full
        elif node.kind is Kind.SYMLINK and node.record_size(build) > BLOCK_SIZE:
            node.datalayout, node.i_u = FLAT_PLAIN, block
            block += 1
        elif node.kind is Kind.SYMLINK:
            node.datalayout = FLAT_INLINE
    return block - first_block


def place_records(nodes: list[Node], build: BuildTime) -> int:
    """Give every inode its nid; returns the metadata area's size in blocks.

    Slot 0 stays empty: a nid is the inode number ``stat`` reports, and some
    programs take inode 0 for a deleted entry. The root is placed first, so
    its nid fits the superblock's 16-bit ``root_nid``.
    """
    space = MetaSpace()
    space.place(SLOT_SIZE)
    for node in nodes:
        node.nid = space.place(node.record_size(build)) // SLOT_SIZE
    return space.blocks


def dir_blocks(node: Node) -> Iterator[bytes]:
    """A directory's blocks, unpadded, nids filled in (the last one may be the inline tail)."""
    assert node.dir_layout is not None and node.children is not None
    parent = node.parent or node
    targets = {b".": (node.nid, FT_DIR), b"..": (parent.nid, FT_DIR)}
    layout = node.dir_layout
    for start, end in layout.blocks:
        names = layout.names[start:end]
        found = [targets.get(n) or _child(node, n) for n in names]
        yield encode_block(names, found)


def _child(node: Node, name: bytes) -> tuple[int, int]:
    assert node.children is not None
    child = node.children[name]
    return child.nid, child.file_type


def write_outside_blocks(nodes: list[Node], area: DataArea) -> None:
    """Write the directory and symlink blocks :func:`plan_dirs_and_links` planned."""
    for node in nodes:
        if node.kind is Kind.DIR:
            blocks = list(dir_blocks(node))
            if node.datalayout == FLAT_INLINE:
                tail = blocks.pop()
                assert len(tail) == len(node.extra)
                node.extra = tail
            for block in blocks:
                area.write(block)
                area.pad_block()
        elif node.kind is Kind.SYMLINK and node.datalayout == FLAT_PLAIN:
            area.write(node.extra)
            area.pad_block()
            node.extra = b""


def meta_area(nodes: list[Node], build: BuildTime, shared: SharedXattrs, blocks: int) -> bytes:
    """The metadata area: every record at its nid, zeros between."""
    area = bytearray(blocks * BLOCK_SIZE)
    for node in nodes:
        where = f"erofs: inode {node.ino}"
        icount, ibody = shared.ibody(node.xattrs, where)
        record = node.pack(build, icount, ibody)
        offset = node.nid * SLOT_SIZE
        area[offset : offset + len(record)] = record
    return bytes(area)


def check_size(blocks: int) -> None:
    """Refuse an image past the 32-bit block count of the superblock."""
    if blocks > 0xFFFFFFFF:
        raise ErofsInputError(f"erofs: the image needs {blocks} blocks, more than 2**32 - 1")
