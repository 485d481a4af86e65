"""One inode in memory, and its record in the metadata area.

A record is the on-disk inode (``struct erofs_inode_compact`` or
``struct erofs_inode_extended``), the inline xattr body, then the inline data:
a regular file's or directory's tail (``EROFS_INODE_FLAT_INLINE``), a
symlink's target, or a chunked file's block map (``EROFS_INODE_CHUNK_BASED``).

Compact or extended: a compact inode has 16-bit uid, gid and nlink, a 32-bit
size, and no mtime of its own; the kernel gives it the superblock's
``build_time`` (``fs/erofs/inode.c``, "use build time for compact inodes").
Tar mtimes are part of the image, so an inode is compact only when its
mtime equals the build time exactly; the writer picks the build time as the
most common mtime of the image, which keeps most inodes compact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypeman_images.disk.erofs.dirs import DirLayout
from hypeman_images.disk.erofs.format import (
    COMPACT_SIZE,
    EXTENDED_SIZE,
    FLAT_PLAIN,
    FT_BLK,
    FT_CHR,
    FT_DIR,
    FT_FIFO,
    FT_LNK,
    FT_REG,
    FT_SOCK,
    LAYOUT_COMPACT,
    LAYOUT_EXTENDED,
    U16_MAX,
    U32_MAX,
    i_format,
    pack_compact,
    pack_extended,
)
from hypeman_images.disk.erofs.model import Kind
from hypeman_images.disk.erofs.xattrs import Stored

_S_IF = {
    Kind.FILE: (0o100000, FT_REG),
    Kind.DIR: (0o040000, FT_DIR),
    Kind.SYMLINK: (0o120000, FT_LNK),
    Kind.CHAR: (0o020000, FT_CHR),
    Kind.BLOCK: (0o060000, FT_BLK),
    Kind.FIFO: (0o010000, FT_FIFO),
    Kind.SOCKET: (0o140000, FT_SOCK),
}


@dataclass(slots=True, eq=False)
class Node:
    """An inode being built. ``extra`` is what follows the xattrs in its record.

    ``i_u`` is ``raw_blkaddr`` (flat layouts), the encoded device number, or
    the chunk format; ``ino`` is ``i_ino`` (the order the inode was added).
    """

    kind: Kind
    mode: int
    uid: int
    gid: int
    mtime: int
    mtime_nsec: int
    ino: int
    xattrs: tuple[Stored, ...]
    nlink: int = 1
    size: int = 0
    datalayout: int = FLAT_PLAIN
    i_u: int = 0
    extra: bytes = b""
    children: dict[bytes, Node] | None = None
    parent: Node | None = None
    dir_layout: DirLayout | None = None
    nid: int = 0
    xattr_size: int = field(default=0)

    @property
    def file_type(self) -> int:
        """The dirent ``file_type`` of this inode."""
        return _S_IF[self.kind][1]

    def extended(self, build_time: tuple[int, int]) -> bool:
        """Whether the record needs the 64-byte inode (see the module docstring)."""
        return (
            self.uid > U16_MAX
            or self.gid > U16_MAX
            or self.nlink > U16_MAX
            or self.size > U32_MAX
            or (self.mtime, self.mtime_nsec) != build_time
        )

    def record_size(self, build_time: tuple[int, int]) -> int:
        """Bytes of the record; a directory's inline tail is followed by one NUL.

        ``fs/erofs/namei.c`` compares the last name of a block up to the
        first NUL or the block's end, so a tail inside a metadata block must
        be followed by a zero byte, never by the next record.
        """
        isize = EXTENDED_SIZE if self.extended(build_time) else COMPACT_SIZE
        nul = 1 if self.kind is Kind.DIR and self.extra else 0
        return isize + self.xattr_size + len(self.extra) + nul

    def pack(self, build_time: tuple[int, int], icount: int, ibody: bytes) -> bytes:
        """The record's bytes (without the padding to the next slot)."""
        mode = _S_IF[self.kind][0] | self.mode
        if self.extended(build_time):
            fmt = i_format(LAYOUT_EXTENDED, self.datalayout)
            core = pack_extended(
                fmt,
                icount,
                mode,
                self.size,
                self.i_u,
                self.ino,
                self.uid,
                self.gid,
                self.mtime,
                self.mtime_nsec,
                self.nlink,
            )
        else:
            fmt = i_format(LAYOUT_COMPACT, self.datalayout)
            core = pack_compact(
                fmt, icount, mode, self.nlink, self.size, self.i_u, self.ino, self.uid, self.gid
            )
        return core + ibody + self.extra
