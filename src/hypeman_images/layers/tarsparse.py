"""GNU sparse files (``tar --sparse``): their maps, read and checked.

Sparse files are read in every format Go's ``archive/tar`` reads, which
containerd, docker and umoci use: the old GNU ``S`` type (map in the header
and its extension blocks), PAX 0.0 (``GNU.sparse.offset``/``numbytes``
records), 0.1 (``GNU.sparse.map``) and 1.0
(``GNU.sparse.major/minor/name/realsize``, the map at the start of the data).
Such an entry is a regular file of its real size; its body is the stored data
with the holes put back as zeros, which :class:`tarread.TarReader` streams.

The maps' blocks come from the reader through ``next_block(used, where)``: it
returns the next block of a map of which ``used`` bytes were read, and holds
the map to the reader's header limit.

References: GNU tar manual "Storing Sparse Files" (formats 0.0, 0.1, 1.0); Go
``archive/tar/reader.go``; libarchive ``tar(5)``.
"""

from __future__ import annotations

from collections.abc import Callable

from hypeman_images.errors import LayerError
from hypeman_images.layers.tar import BLOCK, parse_number
from hypeman_images.oci.wire import decimal

# A sparse file's data fragments: (offset in the file, length), ascending, disjoint.
SparseMap = tuple[tuple[int, int], ...]
SPARSE_PAIR = ("GNU.sparse.offset", "GNU.sparse.numbytes")  # PAX 0.0, one record each
SPARSE_MAP = "GNU.sparse.map"
_GNU_MAGIC = b"ustar  \0"  # magic + version of the GNU format (the old ``S`` type's)

# The next block of a sparse map, given the bytes of the map read before it and
# where the entry is (for the errors).
NextBlock = Callable[[int, str], bytes]


def sparse_format(pax: dict[str, bytes], where: str, ordinal: int) -> int | None:
    """0 (formats 0.0, 0.1), 1 (1.0), or ``None``: not a sparse file (as Go decides).

    Go reads an unknown version as a plain file whose data is the stored
    fragments and their map; that would put the map inside the file, so an
    unknown version is refused instead.
    """
    major, minor = pax.get("GNU.sparse.major"), pax.get("GNU.sparse.minor")
    if major is None and minor is None:
        return 0 if pax.get(SPARSE_MAP) is not None else None
    if major == b"0" and minor in (b"0", b"1"):
        return 0
    if major == b"1" and minor == b"0":
        return 1
    raise LayerError(
        f"{where}, entry {ordinal}: GNU sparse format {major!r}.{minor!r} is not one GNU tar "
        "writes (0.0, 0.1, 1.0)"
    )


def _decimal(text: bytes, where: str) -> int:
    number = decimal(text.decode("ascii", "replace"))
    if number is None:
        raise LayerError(f"{where}: corrupt sparse map: {text[:40]!r} is not a number")
    return number


def map_0_x(pax: dict[str, bytes], where: str) -> list[tuple[int, int]]:
    """Formats 0.0 (joined by the PAX parser) and 0.1: ``GNU.sparse.map`` as
    ``offset,length,...`` with ``GNU.sparse.numblocks`` pairs."""
    count = _decimal(pax.get("GNU.sparse.numblocks", b""), where)
    raw = pax.get(SPARSE_MAP, b"")
    numbers = [_decimal(n, where) for n in raw.split(b",")] if raw else []
    if len(numbers) != 2 * count:
        raise LayerError(
            f"{where}: corrupt sparse map: {len(numbers)} numbers for {count} fragments"
        )
    return list(zip(numbers[::2], numbers[1::2], strict=True))


def _gnu_fragments(
    block: bytes, start: int, count: int, out: list[tuple[int, int]], where: str
) -> None:
    for at in range(start, start + 24 * count, 24):
        if block[at] == 0:  # GNU tar, BSD tar and Go stop at the first empty slot
            return
        out.append(
            (
                parse_number(block[at : at + 12], "sparse offset", where),
                parse_number(block[at + 12 : at + 24], "sparse length", where),
            )
        )


def gnu_map(block: bytes, where: str, next_block: NextBlock) -> tuple[int, list[tuple[int, int]]]:
    """The old GNU format: 4 fragments in the header, 21 in each extension block."""
    if block[257:265] != _GNU_MAGIC:
        # STAR uses the same type flag for another layout; Go refuses it too.
        raise LayerError(f"{where}: a sparse ('S') entry outside the GNU tar format")
    real = parse_number(block[483:495], "realsize", where)
    fragments: list[tuple[int, int]] = []
    _gnu_fragments(block, 386, 4, fragments, where)
    extended, spent = block[482], 0
    while extended:
        ext = next_block(spent, where)
        spent += BLOCK
        _gnu_fragments(ext, 0, 21, fragments, where)
        extended = ext[504]
    return real, fragments


def map_1_0(stored: int, where: str, next_block: NextBlock) -> tuple[list[tuple[int, int]], int]:
    """Format 1.0: decimal lines at the start of the data (count, then offset and
    length per fragment), padded to a block; the map and the blocks it used."""
    data = bytearray()
    lines, wanted = 0, 1
    while lines < wanted:
        if len(data) + BLOCK > stored:
            raise LayerError(f"{where}: the sparse map runs past the entry's data")
        block = next_block(len(data), where)
        data += block
        lines += block.count(b"\n")
        if wanted == 1 and lines:
            count = _decimal(bytes(data).split(b"\n", 1)[0], where)
            wanted = 1 + 2 * count
    numbers = [_decimal(n, where) for n in bytes(data).split(b"\n", wanted)[1:wanted]]
    return list(zip(numbers[::2], numbers[1::2], strict=True)), len(data)


def check_map(fragments: list[tuple[int, int]], real: int, stored: int, where: str) -> SparseMap:
    """The fragments, checked as BSD tar and Go check them, empty ones dropped.

    Each must start at or after the end of the one before (no overlap, never
    backwards) and end within the real size, and together they must account
    for exactly the stored data.
    """
    if real < 0:
        raise LayerError(f"{where}: sparse file with a negative real size")
    end = total = 0
    for start, length in fragments:
        if start < end:
            raise LayerError(
                f"{where}: sparse map fragment at {start} overlaps or precedes the one ending "
                f"at {end}"
            )
        end = start + length
        if end > real:
            raise LayerError(
                f"{where}: sparse map fragment {start}+{length} runs past the real size {real}"
            )
        total += length
    if total != stored:
        raise LayerError(
            f"{where}: sparse map describes {total} bytes of data but the entry stores {stored}"
        )
    return tuple((start, length) for start, length in fragments if length)
