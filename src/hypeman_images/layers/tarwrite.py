"""Writing tar streams: :func:`encode_header` makes one entry's header block(s).

Each entry gets a ustar header, preceded by a PAX extended header when a value
does not fit ustar (long names, big ids and sizes, xattrs). The output is a
function of the arguments alone: same entries, same bytes.

References: POSIX.1-2008 ``pax`` (ustar and extended headers); libarchive
``tar(5)``.
"""

from __future__ import annotations

from hypeman_images.layers.tar import BLOCK, PAX_LOCAL, XATTR_PREFIX, block_sum

END_OF_ARCHIVE = b"\0" * (2 * BLOCK)

# Largest values the octal ustar fields hold (7 digits for ids, 11 for size/mtime).
MAX_OCTAL_ID = 0o7777777
MAX_OCTAL_SIZE = 0o77777777777


def pax_record(key: bytes, value: bytes) -> bytes:
    """One PAX record ``"<len> <key>=<value>\\n"``; ``len`` counts its own digits."""
    body_len = len(key) + len(value) + 3  # ' ', '=', '\n'
    length = body_len + len(str(body_len))
    if len(str(length)) + body_len != length:  # adding the digits added a digit
        length += 1
    return b"%d %s=%s\n" % (length, key, value)


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _split_ustar(name: bytes) -> tuple[bytes, bytes] | None:
    """``(prefix, name)`` fitting ustar's 155 + 100 bytes, or ``None`` if impossible."""
    if len(name) <= 100:
        return b"", name
    cut = name.rfind(b"/", 0, 156)
    while cut > 0:
        if len(name) - cut - 1 <= 100:
            return name[:cut], name[cut + 1 :]
        cut = name.rfind(b"/", 0, cut)
    return None


def _block(
    name: bytes,
    prefix: bytes,
    typeflag: bytes,
    *,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    linkname: bytes,
    devmajor: int,
    devminor: int,
) -> bytes:
    # One format, not a join of fields: this runs once per entry of the image.
    # The checksum field is summed as spaces; uname and gname stay empty so no
    # reader maps names to ids.
    head = b"%s%07o\0%07o\0%07o\0%011o\0%011o\0" % (
        name.ljust(100, b"\0"), mode, uid, gid, size, mtime,
    )  # fmt: skip
    tail = b"%s%sustar\x0000%s%07o\0%07o\0%s%s" % (
        typeflag, linkname.ljust(100, b"\0"), _NUL_64, devmajor, devminor,
        prefix.ljust(155, b"\0"), _NUL_12,
    )  # fmt: skip
    return b"%s%06o\0 %s" % (head, block_sum(head) + block_sum(tail) + 256, tail)


_NUL_64, _NUL_12 = b"\0" * 64, b"\0" * 12
_PAX_NAME = b"././@PaxHeader"  # fixed so the output is deterministic; readers ignore it


def encode_header(
    name: bytes,
    typeflag: bytes,
    *,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    size: int = 0,
    mtime: int = 0,
    linkname: bytes = b"",
    devmajor: int = 0,
    devminor: int = 0,
    xattrs: tuple[tuple[str, bytes], ...] = (),
) -> bytes:
    """The header block(s) of one entry: a PAX header when needed, then ustar.

    PAX carries what ustar cannot: names over the 155/100 split, link names
    over 100 bytes, ids over 7 octal digits, sizes of 8 GiB and more, mtimes
    outside 0..8^11, and xattrs (``SCHILY.xattr.<name>``, raw binary values).
    A PAX ``path``/``linkpath`` that is not UTF-8 is announced with
    ``hdrcharset=BINARY`` (POSIX pax; libarchive then keeps the bytes -- verified
    with mke2fs 1.47.2, which otherwise refuses the name).
    """
    records: list[bytes] = []
    split = _split_ustar(name)
    if split is None:
        records.append(pax_record(b"path", name))
        split = b"", name[:100]
    if len(linkname) > 100:
        records.append(pax_record(b"linkpath", linkname))
    if records and not all(_is_utf8(v) for v in (name, linkname)):
        records.insert(0, pax_record(b"hdrcharset", b"BINARY"))
    if uid > MAX_OCTAL_ID:
        records.append(pax_record(b"uid", b"%d" % uid))
    if gid > MAX_OCTAL_ID:
        records.append(pax_record(b"gid", b"%d" % gid))
    if size > MAX_OCTAL_SIZE:
        records.append(pax_record(b"size", b"%d" % size))
    if not 0 <= mtime <= MAX_OCTAL_SIZE:
        records.append(pax_record(b"mtime", b"%d" % mtime))
    for key, value in xattrs:
        records.append(pax_record(XATTR_PREFIX.encode() + key.encode(), value))
    out = b""
    if records:
        data = b"".join(records)
        out = _block(
            _PAX_NAME, b"", PAX_LOCAL, mode=0o644, uid=0, gid=0, size=len(data), mtime=0,
            linkname=b"", devmajor=0, devminor=0,
        )  # fmt: skip
        out += data + b"\0" * (-len(data) % BLOCK)
    prefix, short = split
    return out + _block(
        short,
        prefix,
        typeflag,
        mode=mode & 0o7777,
        uid=uid if uid <= MAX_OCTAL_ID else 0,
        gid=gid if gid <= MAX_OCTAL_ID else 0,
        size=size if size <= MAX_OCTAL_SIZE else 0,
        mtime=mtime if 0 <= mtime <= MAX_OCTAL_SIZE else 0,
        linkname=linkname[:100],
        devmajor=devmajor,
        devminor=devminor,
    )


def padding(size: int) -> bytes:
    """The zero bytes that follow a body of ``size`` bytes."""
    return b"\0" * (-size % BLOCK)
