"""Placing inode records in the metadata area (best fit, no record split).

An inode's record is its on-disk inode, its inline xattrs and then either its
inline tail or its chunk block map; it starts on a 32-byte slot, and its nid
is its offset from ``meta_blkaddr`` / 32. Inline data must not cross a block
boundary (``fs/erofs/inode.c``: "inline data cross block boundary"), so a
record that fits in a block is put whole into the open block with the least
room that still takes it; larger records (only huge xattrs or block maps)
start on a fresh block.
"""

from __future__ import annotations

import heapq

from hypeman_images.disk.erofs.format import BLOCK_SIZE, SLOT_SIZE, round_up

_SLOTS = BLOCK_SIZE // SLOT_SIZE


class MetaSpace:
    """A best-fit allocator of 32-byte slots in 4 KiB blocks; deterministic."""

    def __init__(self) -> None:
        self.blocks = 0
        # free slot count -> heap of block numbers with exactly that many free
        self._open: list[list[int]] = [[] for _ in range(_SLOTS)]
        self._mask = 0  # bit f set when self._open[f] is not empty
        self._used: dict[int, int] = {}  # block -> slots used, for open blocks

    def place(self, size: int) -> int:
        """Reserve ``size`` bytes; returns their byte offset in the area (slot-aligned)."""
        slots = round_up(max(size, 1), SLOT_SIZE) // SLOT_SIZE
        if slots > _SLOTS:
            offset = self.blocks * BLOCK_SIZE
            self.blocks += -(-slots // _SLOTS)
            self._reopen(self.blocks - 1, slots % _SLOTS or _SLOTS)
            return offset
        fits = self._mask >> slots
        if not fits:
            block, used = self.blocks, 0
            self.blocks += 1
        else:
            free = slots + (fits & -fits).bit_length() - 1
            block = heapq.heappop(self._open[free])
            if not self._open[free]:
                self._mask &= ~(1 << free)
            used = self._used.pop(block)
        self._reopen(block, used + slots)
        return block * BLOCK_SIZE + used * SLOT_SIZE

    def _reopen(self, block: int, used: int) -> None:
        free = _SLOTS - used
        if 0 < free < _SLOTS:
            heapq.heappush(self._open[free], block)
            self._mask |= 1 << free
            self._used[block] = used
