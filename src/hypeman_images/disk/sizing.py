"""How big an ext4 disk must be: blocks and inodes from what flatten counted.

Pure arithmetic, no processes: :func:`plan_disk` sizes a disk for a known
tree (the two-pass build, and the size a one-pass disk shrinks to),
:func:`one_pass_layout` for a tree known only once it is written. The
metadata counted is that of the features :mod:`hypeman_images.disk.mke2fs`
asks for: 4 KiB blocks, 256-byte inodes, 64-byte group descriptors
(``64bit``), superblock copies only in the ``sparse_super`` groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

BLOCK_SIZE = 4096
INODE_SIZE = 256
BLOCKS_PER_GROUP = BLOCK_SIZE * 8

# Inodes 1..10 are reserved and 11 is lost+found (EXT2_GOOD_OLD_FIRST_INO).
_FIRST_INODE = 11
_INODES_PER_ITABLE_BLOCK = BLOCK_SIZE // INODE_SIZE
_DESC_SIZE = 64  # 64bit feature
# A directory block may end in a 12-byte checksum tail (metadata_csum, no longer
# asked for; still reserved so the sizing stays what it was), and an
# entry never spans blocks, so a block can waste up to one maximal entry
# (8 + 255 name bytes, rounded to 4).
_DIR_BLOCK_USABLE = BLOCK_SIZE - 12 - 264
_DOT_ENTRIES = 24  # "." and ".." (12 bytes each)
_LOST_FOUND_BLOCKS = 4  # mke2fs grows lost+found to 16 KiB
_EXTENT_MAX_BLOCKS = 32768  # 128 MiB per extent at 4 KiB blocks
_EXTENTS_PER_BLOCK = (BLOCK_SIZE - 12) // 12  # 340
_MARGIN_BLOCKS = 64
_INODE_MARGIN = 16

# The most inodes a group can hold (one per block): what the one-pass disk's
# groups get on a large image, since nothing says how many entries the layers
# have before they are read. The table's unused blocks are never written (a
# sparse file), but they count in the disk's size: 8 MiB per 128 MiB group.
ONE_PASS_INODES_PER_GROUP = BLOCKS_PER_GROUP


@dataclass(frozen=True)
class SizeInputs:
    """What the disk must hold, counted by flatten before the stream starts.

    ``inodes``: distinct inodes of the tree (hard links count once, the root
    directory not included). ``directories``: how many of them are
    directories. ``file_blocks``: sum of ceil(size / 4096) over regular files.
    ``long_symlinks``: symlinks whose target is 60 bytes or longer (shorter
    ones live in the inode). ``dirent_bytes``: per directory, the sum over its
    entries of 8 + len(name) rounded up to 4 ("." and ".." not included).
    ``xattr_bytes``: sum of len(name) + len(value) over all xattrs.
    """

    inodes: int
    directories: int
    file_bytes: int
    file_blocks: int
    long_symlinks: int
    dirent_bytes: Sequence[int]
    xattr_bytes: int


@dataclass(frozen=True)
class DiskLayout:
    """The size chosen for a disk: ``blocks`` of 4 KiB and ``inodes`` (``-N``)."""

    blocks: int
    inodes: int
    content_blocks: int  # estimated blocks for the tree itself, metadata excluded

    @property
    def size_bytes(self) -> int:
        return self.blocks * BLOCK_SIZE


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _backup_groups(groups: int) -> int:
    """Groups holding a superblock copy with sparse_super: 0, 1 and powers of 3, 5, 7."""
    found = {0, 1} & set(range(groups))
    for base in (3, 5, 7):
        power = base
        while power < groups:
            found.add(power)
            power *= base
    return len(found)


def _metadata_blocks(blocks: int, inodes: int, per_group: int = 0) -> tuple[int, int]:
    """Blocks of fs metadata for a filesystem of ``blocks``; and the real inode count.

    ``per_group``: a fixed number of inodes per group (a resize keeps the one
    the disk was made with); otherwise ``inodes`` spread over the groups.
    """
    groups = _ceil(blocks, BLOCKS_PER_GROUP)
    per_group = per_group or (
        _ceil(_ceil(inodes, groups), _INODES_PER_ITABLE_BLOCK) * _INODES_PER_ITABLE_BLOCK
    )
    inode_tables = groups * per_group // _INODES_PER_ITABLE_BLOCK
    gdt = _ceil(groups * _DESC_SIZE, BLOCK_SIZE)
    supers = _backup_groups(groups) * (1 + gdt)
    return supers + 2 * groups + inode_tables, groups * per_group


def _extent_blocks(blocks: int, files: int) -> int:
    """Extent-tree blocks beyond the 4 extents an inode holds.

    A contiguous file needs one extent per 128 MiB plus one per metadata
    region it runs across; a file needs a tree block only past 4 extents,
    i.e. past ~256 MiB. Zero blocks that mke2fs leaves as holes split extents
    too, but each hole is a data block not written, which pays for the
    extent (340 extents per tree block).
    """
    big_files = min(files, blocks // (4 * _EXTENT_MAX_BLOCKS // 2))
    leaves = _ceil(2 * blocks, _EXTENT_MAX_BLOCKS * _EXTENTS_PER_BLOCK)
    return big_files + leaves


def content_blocks(inputs: SizeInputs) -> int:
    """Blocks the tree itself takes: data, directories, symlinks, extents, xattrs."""
    directories = 0
    for used in [*inputs.dirent_bytes, 0]:  # + root when flatten does not list it
        dir_blocks = max(1, _ceil(used + _DOT_ENTRIES, _DIR_BLOCK_USABLE))
        # Directories grow a block at a time between file data: may fragment.
        directories += dir_blocks + (_ceil(dir_blocks, _EXTENTS_PER_BLOCK) if dir_blocks > 4 else 0)
    missing_dirs = max(0, inputs.directories - len(inputs.dirent_bytes))
    files = max(1, inputs.inodes - inputs.directories)
    # An inode's own xattr space is ~92 bytes; anything more takes a block. A
    # spilling inode carries at least ~32 bytes of names and values.
    xattr_blocks = _ceil(inputs.xattr_bytes, 32)
    return (
        inputs.file_blocks
        + _extent_blocks(inputs.file_blocks, files)
        + directories
        + missing_dirs
        + inputs.long_symlinks
        + xattr_blocks
        + _LOST_FOUND_BLOCKS
    )


def plan_disk(inputs: SizeInputs, free_space: int = 0, inodes_per_group: int = 0) -> DiskLayout:
    """The smallest layout that holds ``inputs`` plus ``free_space`` bytes, with a margin.

    Total = content (see :func:`content_blocks`) + free space + a margin of
    64 blocks + metadata, where metadata (superblock and descriptor copies,
    two bitmaps and the inode table of each group) depends on the total: the
    sum is iterated to a fixed point. ``inodes_per_group`` fixes the inode
    table of each group (the size to shrink a one-pass disk to); then there
    are at least enough groups for the inodes.
    """
    if free_space < 0:
        raise ValueError("free_space must not be negative")
    content = content_blocks(inputs)
    want_inodes = _FIRST_INODE + inputs.inodes + _INODE_MARGIN + free_space // 16384
    base = content + _ceil(free_space, BLOCK_SIZE) + _MARGIN_BLOCKS
    if inodes_per_group:
        base = max(base, (_ceil(want_inodes, inodes_per_group) - 1) * BLOCKS_PER_GROUP + 1)
    blocks = base
    for _ in range(20):
        meta, inodes = _metadata_blocks(blocks, want_inodes, inodes_per_group)
        total = base + meta
        # mke2fs drops a last group too small for its own metadata + 50 blocks
        # (ext2fs_initialize); never let the tail group be that small.
        tail_blocks = total % BLOCKS_PER_GROUP
        group_meta = 3 + _ceil(inodes, _ceil(total, BLOCKS_PER_GROUP)) // _INODES_PER_ITABLE_BLOCK
        if 0 < tail_blocks < group_meta + 64:
            total += group_meta + 64 - tail_blocks
        if total == blocks:
            break
        blocks = total
    _, inodes = _metadata_blocks(blocks, want_inodes, inodes_per_group)
    return DiskLayout(blocks=blocks, inodes=inodes, content_blocks=content)


def one_pass_layout(uncompressed: int, free_space: int = 0) -> DiskLayout:
    """A disk that holds any tree the layers' ``uncompressed`` bytes of tar can make.

    Each entry has a 512-byte header, and takes one inode and at most one
    block per 512 bytes of tar (a directory or a 1-byte file: one block for
    1024 bytes of header and body); so one inode and one block per 512 bytes,
    a sixteenth more for their inode tables, the free space and a margin.
    The file is sparse: what is never written costs nothing, and
    :func:`plan_disk` with the disk's own inodes per group says what to shrink
    it to once the tree is known. The inodes per group stay what mke2fs makes
    of this count: a small image's one group gets a small table, a large
    image's groups 32k each (``ONE_PASS_INODES_PER_GROUP``, the most a group
    holds). Implicit parent directories are the one thing not counted: a
    layer of deep paths without directory entries can exhaust it, and mke2fs
    then says so.
    """
    entries = _ceil(uncompressed, 512)
    inodes = _FIRST_INODE + entries + free_space // 16384 + 1024
    blocks = entries + entries // 16 + _ceil(free_space, BLOCK_SIZE) + 4 * _MARGIN_BLOCKS
    groups = _ceil(blocks, BLOCKS_PER_GROUP)
    inodes = min(inodes, groups * ONE_PASS_INODES_PER_GROUP)
    return DiskLayout(blocks=blocks, inodes=inodes, content_blocks=0)


def grow(layout: DiskLayout) -> DiskLayout:
    """A quarter more blocks and inodes: the retry after mke2fs ran out of room."""
    return DiskLayout(
        blocks=layout.blocks + layout.blocks // 4,
        inodes=layout.inodes + layout.inodes // 4,
        content_blocks=layout.content_blocks,
    )
