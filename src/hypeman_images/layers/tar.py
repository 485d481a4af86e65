"""The tar format both directions share: the block, the type flags, numeric fields, the checksum.

:mod:`tarread` reads tar streams and :mod:`tarwrite` writes them, both by
hand: Python's ``tarfile`` encodes PAX values as UTF-8 text, which corrupts
binary xattr values, and its parser costs several times what inflating does.
GNU sparse maps are read by :mod:`tarsparse`.

References: POSIX.1-2008 ``pax`` (ustar and extended headers); GNU tar manual
"Basic Tar Format" (``L``/``K``, base-256 numbers); libarchive ``tar(5)``; Go
``archive/tar/reader.go``.
"""

from __future__ import annotations

from hypeman_images.errors import LayerError

BLOCK = 512

# Type flags (POSIX ustar, plus the GNU and PAX meta types).
REGULAR = b"0"
HARDLINK = b"1"
SYMLINK = b"2"
CHAR = b"3"
BLOCKDEV = b"4"
DIRECTORY = b"5"
FIFO = b"6"
CONTIGUOUS = b"7"  # POSIX: "may be treated as a regular file"
PAX_LOCAL = b"x"
PAX_GLOBAL = b"g"
GNU_LONGNAME = b"L"
GNU_LONGLINK = b"K"
GNU_SPARSE = b"S"
GNU_VOLUME = b"V"
GNU_DUMPDIR = b"D"  # a directory whose body lists names; the body is ignored
GNU_MULTIVOL = b"M"

# PAX records of this prefix carry extended attributes (``SCHILY.xattr.<name>``).
XATTR_PREFIX = "SCHILY.xattr."


def parse_number(field: bytes, what: str, where: str) -> int:
    """An octal (NUL/space padded) or GNU base-256 numeric field."""
    # Fast path, nearly every field: octal digits padded with spaces and NULs
    # (a checksum is "%06o\0 "). Anything else raises and is read below.
    try:
        return int(field.strip(b" \0") or b"0", 8)
    except ValueError:
        pass
    if field and field[0] & 0x80:
        # GNU base-256: the first byte's top bit marks it; 0xff starts a negative number.
        value = int.from_bytes(field, "big") & ~(0x80 << (8 * (len(field) - 1)))
        if field[0] & 0x40:
            value -= 1 << (8 * len(field) - 1)
        return value
    # "<digits>\0<garbage>" is still a number to GNU tar and Go; anything else is not.
    head = field.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(head, 8) if head else 0
    except ValueError:
        raise LayerError(
            f"{where}: corrupt tar header: {what} field {field!r} is not octal"
        ) from None


def block_sum(block: bytes) -> int:
    """The sum of the bytes: a header's checksum.

    The NULs (most of a header) add nothing, and dropping them first makes
    ``sum`` several times faster; it runs once per header read or written.
    """
    return sum(block.translate(None, b"\0"))
