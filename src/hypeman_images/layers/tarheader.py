"""One logical tar entry's header, decoded: ustar fields, PAX records, GNU long names.

A logical entry is a ustar header plus whatever PAX (``x``/``g``) or GNU
``L``/``K`` headers precede it; :class:`tarread.TarReader` collects those and
:func:`decode_header` turns them into one :class:`Header`. PAX values stay raw
bytes (binary xattr values survive), and a later record wins.

References: POSIX.1-2008 ``pax`` (ustar and extended headers); GNU tar manual
"Basic Tar Format"; Go ``archive/tar/reader.go``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hypeman_images.errors import LayerError
from hypeman_images.layers.tar import (
    CONTIGUOUS,
    DIRECTORY,
    GNU_DUMPDIR,
    GNU_MULTIVOL,
    GNU_SPARSE,
    REGULAR,
    XATTR_PREFIX,
    parse_number,
)
from hypeman_images.layers.tarsparse import SPARSE_MAP, SPARSE_PAIR, SparseMap, sparse_format

REGULAR_FLAGS = (REGULAR, b"\0", CONTIGUOUS)  # each a regular file (POSIX, old tars)

# Header.sparse of an entry whose map is still to be read (TarReader._sparse).
_UNREAD: SparseMap = ((-1, -1),)

# A header's numeric fields, in one unpack: mode, uid, gid, size, mtime, checksum,
# then (after typeflag, linkname, magic, version, uname, gname) devmajor, devminor.
_NUMBERS = struct.Struct("100x8s8s8s12s12s8s1x100x6x2x32x32x8s8s")
_NUMBER_NAMES = ("mode", "uid", "gid", "size", "mtime", "checksum", "devmajor", "devminor")


@dataclass(slots=True)  # not frozen: see entries.Entry
class Header:
    """One logical tar entry, with PAX and GNU extensions already applied.

    ``name`` and ``linkname`` are the raw bytes of the archive (not yet
    normalised). ``typeflag`` is one of :mod:`tar`'s type constants; regular
    files always come out as :data:`tar.REGULAR`. ``xattrs`` keep the archive's order.
    """

    ordinal: int
    name: bytes
    typeflag: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    linkname: bytes
    devmajor: int
    devminor: int
    xattrs: tuple[tuple[str, bytes], ...]
    offset: int = 0  # where the body starts in the stream (after every header block)
    # A sparse file's data fragments; ``size`` is then its real size, holes included,
    # and the body at ``offset`` holds only the fragments' bytes, one after another.
    sparse: SparseMap | None = None


def plain_numbers(block: bytes) -> list[int] | None:
    """The header's numeric fields (:data:`_NUMBER_NAMES`) if all take the fast path.

    :func:`tar.parse_number`'s fast path for the eight at once, as nearly every
    header's are: one call per header, not eight, as the reader runs per entry.
    ``None`` otherwise.
    """
    try:
        return [int(f.strip(b" \0") or b"0", 8) for f in _NUMBERS.unpack_from(block)]
    except ValueError:
        return None


def parse_pax(data: bytes, where: str) -> dict[str, bytes]:
    """PAX records ``"<len> <key>=<value>\\n"``; values stay raw bytes.

    A later record replaces an earlier one of the same key, except the
    repeated ``GNU.sparse.offset``/``numbytes`` pairs of sparse format 0.0,
    which are joined into one ``GNU.sparse.map`` value as Go's reader does.
    """
    records: dict[str, bytes] = {}
    pairs: list[bytes] = []
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # padding some writers leave at the end
            break
        space = data.find(b" ", pos, pos + 21)
        try:
            length = int(data[pos:space]) if space > pos else -1
        except ValueError:
            length = -1
        end = pos + length
        if length <= 0 or end > len(data) or data[end - 1] != 0x0A:
            raise LayerError(f"{where}: corrupt PAX extended header at record offset {pos}")
        key, sep, value = data[space + 1 : end - 1].partition(b"=")
        if not sep:
            raise LayerError(f"{where}: corrupt PAX record without '=' at offset {pos}")
        name = key.decode("utf-8", "surrogateescape")
        if name in SPARSE_PAIR:
            # An offset, then its length, and so on (GNU tar's order; Go checks it too).
            if name != SPARSE_PAIR[len(pairs) % 2] or b"," in value:
                raise LayerError(f"{where}: corrupt PAX sparse map: {name}={value!r} out of order")
            pairs.append(value)
        else:
            records[name] = value
        pos = end
    if pairs:
        records[SPARSE_MAP] = b",".join(pairs)
    return records


def pax_int(value: bytes, key: str, where: str) -> int:
    """The decimal number of PAX record ``key``; an error names it."""
    # mtime may carry a fraction ("1700000000.123456789"); ext4 keeps seconds here.
    text = value.split(b".", 1)[0] if key == "mtime" else value
    try:
        return int(text)
    except ValueError:
        raise LayerError(f"{where}: PAX record {key}={value!r} is not a number") from None


def check_sum(block: bytes, where: str) -> None:
    """Raise :class:`LayerError` unless the header ``block``'s checksum field is right."""
    field = block[148:156]
    stored = parse_number(field, "checksum", where)
    unsigned = sum(block) - sum(field) + 256  # the field counts as spaces
    if stored != unsigned:
        # Some historic writers summed signed chars; accept that form too.
        signed = unsigned - 2 * sum(b for b in block if b >= 128)
        if stored != signed:
            raise LayerError(f"{where}: corrupt tar header (checksum mismatch)")


def decode_header(
    block: bytes,
    numbers: list[int] | None,
    ordinal: int,
    pax: dict[str, bytes],
    long_name: bytes | None,
    long_link: bytes | None,
    where: str,
    offset: int,
) -> Header:
    """One logical entry's :class:`Header` from its ustar ``block``, PAX records, GNU names.

    ``numbers``: the block's fields if :func:`plain_numbers` read them. A sparse
    file's map is left to the reader (``sparse`` is a placeholder until then).
    """
    typeflag = block[156:157]
    sparse: SparseMap | None = None
    if typeflag == GNU_SPARSE or (pax and sparse_format(pax, where, ordinal) is not None):
        sparse, typeflag = _UNREAD, REGULAR  # the map is read by TarReader._sparse
    if typeflag == GNU_MULTIVOL:
        raise LayerError(f"{where}, entry {ordinal}: multi-volume tar entries are not supported")
    if typeflag in REGULAR_FLAGS:
        typeflag = REGULAR
    elif typeflag == GNU_DUMPDIR:
        typeflag = DIRECTORY
    name = block[0:100].partition(b"\0")[0]
    if block[257:263] == b"ustar\x00":  # POSIX ustar: a prefix field may hold the head
        prefix = block[345:500].partition(b"\0")[0]
        if prefix:
            name = prefix + b"/" + name
    if long_name is not None:
        name = long_name
    linkname = long_link if long_link is not None else block[157:257].partition(b"\0")[0]
    if numbers is None:  # not all plain octal: each error names its field
        numbers = [
            parse_number(f, what, where)
            for f, what in zip(_NUMBERS.unpack_from(block), _NUMBER_NAMES, strict=True)
        ]
    mode, uid, gid, size, mtime, _, devmajor, devminor = numbers
    xattrs: list[tuple[str, bytes]] = []
    for key, value in pax.items():
        if key == "path":
            name = value
        elif key == "linkpath":
            linkname = value
        elif key == "size":
            size = pax_int(value, key, where)
        elif key == "uid":
            uid = pax_int(value, key, where)
        elif key == "gid":
            gid = pax_int(value, key, where)
        elif key == "mtime":
            mtime = pax_int(value, key, where)
        elif key.startswith(XATTR_PREFIX):
            xattrs.append((key[len(XATTR_PREFIX) :], value))
    if sparse is not None and pax.get("GNU.sparse.name"):
        name = pax["GNU.sparse.name"]  # formats 0.1 and 1.0 store a made-up ustar name
    if size < 0 or uid < 0 or gid < 0:
        raise LayerError(
            f"{where}, entry {ordinal} ({name!r}): negative size, uid or gid in tar header"
        )
    return Header(
        ordinal,
        name,
        typeflag,
        mode,
        uid,
        gid,
        size if typeflag == REGULAR else 0,
        mtime,
        linkname,
        devmajor,
        devminor,
        tuple(xattrs),
        offset,
        sparse,
    )
