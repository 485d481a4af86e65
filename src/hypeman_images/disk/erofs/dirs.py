"""Directory contents: ``struct erofs_dirent`` blocks, names sorted bytewise.

A directory's data is a run of blocks (``fs/erofs/erofs_fs.h``, "dirent
sorts in alphabet order, thus we can do binary search"; ``fs/erofs/namei.c``
searches the blocks by their first name, then the names in a block). Each
block starts with its dirents; the first dirent's ``nameoff`` / 12 is how
many there are; the names follow, without NULs, each ending where the next
begins. The last name of a block ends at the first NUL or at the block's
end, and the last block ends at ``i_size``. ``.`` and ``..`` are ordinary
entries, sorted with the rest. Names never cross a block boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypeman_images.disk.erofs.format import BLOCK_SIZE, DIRENT_SIZE, pack_dirent


@dataclass(frozen=True, slots=True)
class DirLayout:
    """Where each of a directory's sorted names falls: ``blocks[i]`` is a range of them.

    ``size`` is the directory's ``i_size``: full blocks, then the bytes the
    last block uses. ``tail`` is that last block's length.
    """

    names: tuple[bytes, ...]
    blocks: tuple[tuple[int, int], ...]
    size: int

    @property
    def tail(self) -> int:
        """Bytes of the last block (a full block counts whole)."""
        return self.size - (len(self.blocks) - 1) * BLOCK_SIZE


def plan(names: list[bytes]) -> DirLayout:
    """Sort ``names`` (``.`` and ``..`` included by the caller) and fill blocks greedily."""
    names.sort()
    blocks: list[tuple[int, int]] = []
    start = used = 0
    for i, name in enumerate(names):
        need = DIRENT_SIZE + len(name)
        if used + need > BLOCK_SIZE:
            blocks.append((start, i))
            start, used = i, 0
        used += need
    blocks.append((start, len(names)))
    return DirLayout(tuple(names), tuple(blocks), len(blocks[:-1]) * BLOCK_SIZE + used)


def encode_block(names: tuple[bytes, ...], targets: list[tuple[int, int]]) -> bytes:
    """One block's bytes, unpadded: dirents for ``names`` with their (nid, file type)."""
    nameoff = DIRENT_SIZE * len(names)
    heads = []
    for name, (nid, ftype) in zip(names, targets, strict=True):
        heads.append(pack_dirent(nid, nameoff, ftype))
        nameoff += len(name)
    return b"".join(heads) + b"".join(names)
