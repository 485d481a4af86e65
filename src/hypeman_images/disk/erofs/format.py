"""The EROFS on-disk format: constants and the fixed-size records, packed.

Every number here is a fact of the kernel's format definition,
``fs/erofs/erofs_fs.h`` (and ``Documentation/filesystems/erofs.rst``); the
field comments name the struct each packer writes. Little-endian throughout.
"""

from __future__ import annotations

import struct

BLOCK_BITS = 12
BLOCK_SIZE = 1 << BLOCK_BITS  # the page size; the kernel mounts blkszbits <= PAGE_SHIFT
SUPER_OFFSET = 1024  # EROFS_SUPER_OFFSET: room for x86 boot sectors
SUPER_MAGIC = 0xE0F5E1E2  # EROFS_SUPER_MAGIC_V1
SLOT_SIZE = 32  # nid = byte offset in the metadata area / 32 (islotbits = 5)

COMPAT_SB_CHKSUM = 0x1  # EROFS_FEATURE_COMPAT_SB_CHKSUM: crc32c of the superblock block
COMPAT_MTIME = 0x2  # EROFS_FEATURE_COMPAT_MTIME: extended inodes carry their own mtime
INCOMPAT_CHUNKED_FILE = 0x4  # EROFS_FEATURE_INCOMPAT_CHUNKED_FILE

# i_format: bit 0 the inode version, bits 1-3 the data layout (EROFS_I_*).
LAYOUT_COMPACT = 0  # EROFS_INODE_LAYOUT_COMPACT, struct erofs_inode_compact
LAYOUT_EXTENDED = 1  # EROFS_INODE_LAYOUT_EXTENDED, struct erofs_inode_extended
FLAT_PLAIN = 0  # EROFS_INODE_FLAT_PLAIN: contiguous blocks from raw_blkaddr
FLAT_INLINE = 2  # EROFS_INODE_FLAT_INLINE: contiguous blocks, the tail after the inode
CHUNK_BASED = 4  # EROFS_INODE_CHUNK_BASED: a block map of chunks after the inode
COMPACT_SIZE = 32
EXTENDED_SIZE = 64

CHUNK_BLKBITS_MASK = 0x1F  # EROFS_CHUNK_FORMAT_BLKBITS_MASK; no INDEXES bit: 4-byte map
CHUNK_MAP_ENTRY = 4  # EROFS_BLOCK_MAP_ENTRY_SIZE
NULL_ADDR = 0xFFFFFFFF  # EROFS_NULL_ADDR (-1): a hole, read as zeros

DIRENT_SIZE = 12  # struct erofs_dirent
NAME_MAX = 255  # EROFS_NAME_LEN

# File types of struct erofs_dirent (the generic FT_* values).
FT_REG, FT_DIR, FT_CHR, FT_BLK, FT_FIFO, FT_SOCK, FT_LNK = 1, 2, 3, 4, 5, 6, 7

XATTR_IBODY_HEADER = 12  # struct erofs_xattr_ibody_header
XATTR_ENTRY_HEADER = 4  # struct erofs_xattr_entry
XATTR_VALUE_MAX = 0xFFFF  # e_value_size is __le16
XATTR_SHARED_MAX = 0xFF  # h_shared_count is __u8
XATTR_ICOUNT_MAX = 0xFFFF  # i_xattr_icount is __le16

U16_MAX = 0xFFFF
U32_MAX = 0xFFFFFFFF

# struct erofs_super_block (128 bytes): magic, checksum, feature_compat, blkszbits,
# sb_extslots, root_nid, inos, build_time, build_time_nsec, blocks, meta_blkaddr,
# xattr_blkaddr, uuid, volume_name, feature_incompat, then fields left zero
# (u1, extra_devices, devt_slotoff, dirblkbits, xattr prefixes, packed_nid, reserved).
_SUPER = struct.Struct("<IIIBBHQqIIII16s16sI44x")
SUPER_SIZE = _SUPER.size
# struct erofs_inode_compact: i_format, i_xattr_icount, i_mode, i_nlink, i_size,
# i_reserved, i_u, i_ino, i_uid, i_gid, i_reserved2.
_COMPACT = struct.Struct("<HHHHIIIIHH4x")
# struct erofs_inode_extended: i_format, i_xattr_icount, i_mode, i_reserved, i_size,
# i_u, i_ino, i_uid, i_gid, i_mtime, i_mtime_nsec, i_nlink, i_reserved2[16].
_EXTENDED = struct.Struct("<HHHHQIIIIqII16x")
_DIRENT = struct.Struct("<QHBB")  # nid, nameoff, file_type, reserved
_XATTR_ENTRY = struct.Struct("<BBH")  # e_name_len, e_name_index, e_value_size
_IBODY_HEADER = struct.Struct("<IB7x")  # h_name_filter, h_shared_count, h_reserved2

assert _SUPER.size == 128 and _COMPACT.size == COMPACT_SIZE and _EXTENDED.size == EXTENDED_SIZE
assert _DIRENT.size == DIRENT_SIZE and _IBODY_HEADER.size == XATTR_IBODY_HEADER


def pack_super(
    *,
    root_nid: int,
    inos: int,
    build_time: int,
    build_time_nsec: int,
    blocks: int,
    meta_blkaddr: int,
    xattr_blkaddr: int,
    uuid: bytes,
    feature_incompat: int,
) -> bytes:
    """A ``struct erofs_super_block`` with its checksum field zero (see :func:`checksum`)."""
    return _SUPER.pack(
        SUPER_MAGIC,
        0,
        COMPAT_SB_CHKSUM | COMPAT_MTIME,
        BLOCK_BITS,
        0,
        root_nid,
        inos,
        build_time,
        build_time_nsec,
        blocks,
        meta_blkaddr,
        xattr_blkaddr,
        uuid,
        b"",
        feature_incompat,
    )


def i_format(version: int, datalayout: int) -> int:
    """The ``i_format`` field: version in bit 0, data layout in bits 1-3."""
    return version | (datalayout << 1)


def pack_compact(
    fmt: int, icount: int, mode: int, nlink: int, size: int, i_u: int, ino: int, uid: int, gid: int
) -> bytes:
    """A 32-byte ``struct erofs_inode_compact`` (its mtime is the superblock's build time)."""
    return _COMPACT.pack(fmt, icount, mode, nlink, size, 0, i_u, ino, uid, gid)


def pack_extended(
    fmt: int,
    icount: int,
    mode: int,
    size: int,
    i_u: int,
    ino: int,
    uid: int,
    gid: int,
    mtime: int,
    mtime_nsec: int,
    nlink: int,
) -> bytes:
    """A 64-byte ``struct erofs_inode_extended``."""
    return _EXTENDED.pack(fmt, icount, mode, 0, size, i_u, ino, uid, gid, mtime, mtime_nsec, nlink)


def pack_dirent(nid: int, nameoff: int, file_type: int) -> bytes:
    """A 12-byte ``struct erofs_dirent``."""
    return _DIRENT.pack(nid, nameoff, file_type, 0)


def pack_xattr_entry(index: int, suffix: bytes, value: bytes) -> bytes:
    """A ``struct erofs_xattr_entry`` with its name and value, zero-padded to 4 bytes."""
    raw = _XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
    return raw + bytes(-len(raw) % 4)


def pack_ibody_header(shared_count: int) -> bytes:
    """A ``struct erofs_xattr_ibody_header`` (no name filter: the feature bit is off)."""
    return _IBODY_HEADER.pack(0, shared_count)


def encode_dev(major: int, minor: int) -> int:
    """The kernel's ``new_encode_dev``, as ``i_u.rdev`` holds a device number."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def round_up(n: int, unit: int) -> int:
    """``n`` rounded up to a multiple of ``unit``."""
    return -(-n // unit) * unit


def blocks_of(n: int) -> int:
    """How many blocks ``n`` bytes take."""
    return -(-n // BLOCK_SIZE)
