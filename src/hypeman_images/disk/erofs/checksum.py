"""CRC-32C (Castagnoli) for the superblock checksum, in pure Python.

The kernel checks ``crc32c(~0, sb, blocksize - 1024)`` over the superblock's
block from ``EROFS_SUPER_OFFSET`` with the checksum field zeroed
(``fs/erofs/super.c``, ``erofs_superblock_csum_verify``). Linux's
``crc32c()`` takes the seed as given and does not invert the result, so the
stored value is the standard CRC-32C's register before the final inversion.

Why not a package: the superblock is the only thing EROFS checksums in an
uncompressed image, 3 KiB once per image. A table-driven loop does that in
about a millisecond; the compiled PyPI packages (``crc32c``,
``google-crc32c``) would add a binary dependency to every install for no
measurable gain. If per-block checksums ever appear (compressed images do not
need them either), switch to one of those.
"""

from __future__ import annotations

_POLY = 0x82F63B78  # Castagnoli, bit-reflected


def _table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (_POLY if crc & 1 else 0)
        table.append(crc)
    return tuple(table)


_TABLE = _table()


def crc32c_raw(data: bytes, crc: int = 0xFFFFFFFF) -> int:
    """The CRC-32C register after ``data``, from ``crc``, without the final inversion.

    This is Linux's ``crc32c(crc, data, len)``; the standard CRC-32C of
    ``data`` (RFC 3720) is ``crc32c_raw(data) ^ 0xFFFFFFFF``.
    """
    table = _TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc
