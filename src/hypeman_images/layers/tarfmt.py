"""Tar headers, read and written by hand: ustar, PAX (``x``/``g``), GNU long names, sparse files.

Reading: :class:`TarReader` walks an uncompressed tar stream once, front to back,
hashing every byte it reads (the diff_id is the sha256 of the uncompressed
stream, image-spec ``config.md#layer-diffids``). Each logical entry -- a ustar
header plus whatever PAX or GNU ``L``/``K`` headers precede it -- becomes one
:class:`Header` numbered by its ``ordinal``; the flattener uses that ordinal to
find the body again on its second pass. Bodies are skipped or copied in large
chunks and never held whole in memory.

Writing: :func:`encode_header` produces a ustar header, preceded by a PAX
extended header when a value does not fit ustar. Python's ``tarfile`` is not
used for either direction: it encodes PAX values as UTF-8 text, which corrupts
binary xattr values, and its parser costs several times what inflating does.

Sparse files (GNU tar ``--sparse``) are read in every format Go's
``archive/tar`` reads, which containerd, docker and umoci use: the old GNU
``S`` type (map in the header and its extension blocks), PAX 0.0
(``GNU.sparse.offset``/``numbytes`` records), 0.1 (``GNU.sparse.map``) and 1.0
(``GNU.sparse.major/minor/name/realsize``, the map at the start of the data).
Such an entry is a regular file of its real size; its body is the stored data
with the holes put back as zeros, streamed (:meth:`TarReader.copy_body`).

References: POSIX.1-2008 ``pax`` (ustar and extended headers); GNU tar manual
"Basic Tar Format" (``L``/``K``, base-256 numbers) and "Storing Sparse Files"
(formats 0.0, 0.1, 1.0); libarchive ``tar(5)``; Go ``archive/tar/reader.go``.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from hypeman_images.errors import LayerError, LimitExceeded

BLOCK = 512
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)
_ZERO_BLOCK = b"\0" * BLOCK
_CHUNK = 1 << 20
_ZEROS = memoryview(bytes(_CHUNK))  # the holes of sparse files, written a chunk at a time

# Type flags (POSIX ustar, plus the GNU and PAX meta types).
REGULAR = b"0"
HARDLINK = b"1"
SYMLINK = b"2"
CHAR = b"3"
BLOCKDEV = b"4"
DIRECTORY = b"5"
FIFO = b"6"
_CONTIGUOUS = b"7"  # POSIX: "may be treated as a regular file"
_PAX_LOCAL = b"x"
_PAX_GLOBAL = b"g"
_GNU_LONGNAME = b"L"
_GNU_LONGLINK = b"K"
_GNU_SPARSE = b"S"
_GNU_VOLUME = b"V"
_GNU_DUMPDIR = b"D"  # a directory whose body lists names; the body is ignored
_GNU_MULTIVOL = b"M"
_REGULAR_FLAGS = (REGULAR, b"\0", _CONTIGUOUS)
_HEADER_ONLY = (HARDLINK, SYMLINK, CHAR, BLOCKDEV, DIRECTORY, FIFO)

# Largest values the octal ustar fields hold (7 digits for ids, 11 for size/mtime).
MAX_OCTAL_ID = 0o7777777
MAX_OCTAL_SIZE = 0o77777777777
_XATTR_PREFIX = "SCHILY.xattr."

# A sparse file's data fragments: (offset in the file, length), ascending, disjoint.
SparseMap = tuple[tuple[int, int], ...]
# Header.sparse of an entry whose map is still to be read (TarReader._sparse).
_UNREAD: SparseMap = ((-1, -1),)
_SPARSE_PAIR = ("GNU.sparse.offset", "GNU.sparse.numbytes")  # PAX 0.0, one record each
_SPARSE_MAP = "GNU.sparse.map"
_GNU_MAGIC = b"ustar  \0"  # magic + version of the GNU format (the old ``S`` type's)

# A header's numeric fields, in one unpack: mode, uid, gid, size, mtime, checksum,
# then (after typeflag, linkname, magic, version, uname, gname) devmajor, devminor.
_NUMBERS = struct.Struct("100x8s8s8s12s12s8s1x100x6x2x32x32x8s8s")
_NUMBER_NAMES = ("mode", "uid", "gid", "size", "mtime", "checksum", "devmajor", "devminor")


@dataclass(slots=True)  # not frozen: see flatten.Entry
class Header:
    """One logical tar entry, with PAX and GNU extensions already applied.

    ``name`` and ``linkname`` are the raw bytes of the archive (not yet
    normalised). ``typeflag`` is one of the module's type constants; regular
    files always come out as :data:`REGULAR`. ``xattrs`` keep the archive's order.
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


def _parse_number(field: bytes, what: str, where: str) -> int:
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


def _plain_numbers(block: bytes) -> list[int] | None:
    """The header's numeric fields (:data:`_NUMBER_NAMES`) if all take the fast path.

    :func:`_parse_number`'s fast path for the eight at once, as nearly every
    header's are: one call per header, not eight (issue 7). ``None`` otherwise.
    """
    try:
        return [int(f.strip(b" \0") or b"0", 8) for f in _NUMBERS.unpack_from(block)]
    except ValueError:
        return None


def _sum(block: bytes) -> int:
    """The sum of the bytes: a header's checksum. The NULs (most of a header) add
    nothing, and dropping them first makes ``sum`` three times faster (issue 7)."""
    return sum(block.translate(None, b"\0"))


def _parse_pax(data: bytes, where: str) -> dict[str, bytes]:
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
        if name in _SPARSE_PAIR:
            # An offset, then its length, and so on (GNU tar's order; Go checks it too).
            if name != _SPARSE_PAIR[len(pairs) % 2] or b"," in value:
                raise LayerError(f"{where}: corrupt PAX sparse map: {name}={value!r} out of order")
            pairs.append(value)
        else:
            records[name] = value
        pos = end
    if pairs:
        records[_SPARSE_MAP] = b",".join(pairs)
    return records


def _sparse_format(pax: dict[str, bytes], where: str, ordinal: int) -> int | None:
    """0 (formats 0.0, 0.1), 1 (1.0), or ``None``: not a sparse file (as Go decides).

    Go reads an unknown version as a plain file whose data is the stored
    fragments and their map; that would put the map inside the file, so an
    unknown version is refused instead.
    """
    major, minor = pax.get("GNU.sparse.major"), pax.get("GNU.sparse.minor")
    if major is None and minor is None:
        return 0 if pax.get(_SPARSE_MAP) is not None else None
    if major == b"0" and minor in (b"0", b"1"):
        return 0
    if major == b"1" and minor == b"0":
        return 1
    raise LayerError(
        f"{where}, entry {ordinal}: GNU sparse format {major!r}.{minor!r} is not one GNU tar "
        "writes (0.0, 0.1, 1.0)"
    )


def _decimal(text: bytes, where: str) -> int:
    if not text.isdigit():
        raise LayerError(f"{where}: corrupt sparse map: {text[:40]!r} is not a number")
    return int(text)


def _map_0_x(pax: dict[str, bytes], where: str) -> list[tuple[int, int]]:
    """Formats 0.0 (joined by :func:`_parse_pax`) and 0.1: ``GNU.sparse.map`` as
    ``offset,length,...`` with ``GNU.sparse.numblocks`` pairs."""
    count = _decimal(pax.get("GNU.sparse.numblocks", b""), where)
    raw = pax.get(_SPARSE_MAP, b"")
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
                _parse_number(block[at : at + 12], "sparse offset", where),
                _parse_number(block[at + 12 : at + 24], "sparse length", where),
            )
        )


def _check_map(fragments: list[tuple[int, int]], real: int, stored: int, where: str) -> SparseMap:
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


def _write_zeros(out: BinaryIO, n: int) -> None:
    while n > 0:
        take = min(n, _CHUNK)
        out.write(_ZEROS[:take])
        n -= take


def _pax_int(value: bytes, key: str, where: str) -> int:
    # mtime may carry a fraction ("1700000000.123456789"); ext4 keeps seconds here.
    text = value.split(b".", 1)[0] if key == "mtime" else value
    try:
        return int(text)
    except ValueError:
        raise LayerError(f"{where}: PAX record {key}={value!r} is not a number") from None


class TarReader:
    """Iterate the entries of an uncompressed tar stream, hashing every byte.

    Use as ``for header in reader: ...``; call :meth:`copy_body` during an
    iteration step to stream that entry's data to a file, otherwise the body is
    skipped (read and discarded, still hashed) before the next header. After the
    loop, :attr:`size` and :meth:`hexdigest` describe the whole stream, including
    the padding after the end-of-archive marker.
    """

    def __init__(
        self,
        stream: BinaryIO,
        *,
        where: str,
        max_bytes: int,
        max_header_bytes: int,
        hash_stream: bool = True,
    ) -> None:
        self._stream = stream
        self._where = where
        self._max_bytes = max_bytes
        self._max_header_bytes = max_header_bytes
        self._hash = hashlib.sha256() if hash_stream else None
        self._buf = b""
        self._pos = 0
        self._body_left = 0  # bytes of the current body not yet consumed, padding included
        self._data_left = 0  # of which data (the rest is padding)
        self._fragments: SparseMap | None = None  # the current entry's, if it is sparse
        self._real = 0  # and then its real size
        self._holes = 0  # bytes the holes of sparse files add, counted against max_bytes
        self.size = 0

    # -- raw byte access -------------------------------------------------------

    def _fill(self) -> bool:
        chunk = self._stream.read(_CHUNK)
        if not chunk:
            return False
        self.size += len(chunk)
        if self.size + self._holes > self._max_bytes:
            self._too_big()
        if self._hash is not None:
            self._hash.update(chunk)
        self._buf = self._buf[self._pos :] + chunk if self._pos < len(self._buf) else chunk
        self._pos = 0
        return True

    def _too_big(self, where: str = "") -> None:
        holes = " (holes of sparse files included)" if self._holes else ""
        raise LimitExceeded(
            f"{where or self._where}: uncompressed size{holes} exceeds Limits.max_layer_bytes="
            f"{self._max_bytes}; raise that limit if the image is trusted"
        )

    def _read(self, n: int) -> bytes | None:
        """Exactly ``n`` bytes; ``None`` at a clean end of stream; error if cut short."""
        while len(self._buf) - self._pos < n:
            if not self._fill():
                if self._pos == len(self._buf):
                    return None
                raise LayerError(f"{self._where}: tar stream is truncated")
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        return out

    def _skip(self, n: int) -> None:
        avail = len(self._buf) - self._pos
        if n <= avail:
            self._pos += n
            return
        n -= avail
        self._buf, self._pos = b"", 0
        while n > 0:
            if not self._fill():
                raise LayerError(f"{self._where}: tar stream is truncated inside an entry")
            take = min(n, len(self._buf))
            self._pos = take
            n -= take

    def _read_block_payload(self, size: int, ordinal: int) -> bytes:
        """The data of a meta entry (PAX, GNU long name) of entry ``ordinal``, padding skipped."""
        if size > self._max_header_bytes:
            raise LimitExceeded(
                f"{self._where}, entry {ordinal}: an extended tar header of {size} bytes "
                f"exceeds Limits.max_header_bytes={self._max_header_bytes}"
            )
        padded = size + (-size % BLOCK)
        data = self._read(padded)
        if data is None:
            raise LayerError(
                f"{self._where}, entry {ordinal}: tar stream ends inside an extended header"
            )
        return data[:size]

    # -- the public walk -------------------------------------------------------

    def copy_body(self, out: BinaryIO) -> None:
        """Copy the current entry's data to ``out`` in large chunks; padding is skipped.

        A sparse file's data comes out at its real size: the stored fragments
        with zeros in the holes between and after them.
        """
        if self._fragments is None:
            self._copy(self._data_left, out)
        else:
            self._expand(self._fragments, self._real, out)
        self._body_left -= self._data_left
        self._data_left = 0

    def _copy(self, n: int, out: BinaryIO) -> None:
        while n > 0:
            if self._pos >= len(self._buf) and not self._fill():
                raise LayerError(f"{self._where}: tar stream is truncated inside a file body")
            take = min(n, len(self._buf) - self._pos)
            out.write(memoryview(self._buf)[self._pos : self._pos + take])
            self._pos += take
            n -= take

    def _expand(self, fragments: SparseMap, real: int, out: BinaryIO) -> None:
        """The stored fragments at their offsets, zeros around them, up to ``real`` bytes."""
        pos = 0
        for start, length in fragments:
            _write_zeros(out, start - pos)
            self._copy(length, out)
            pos = start + length
        _write_zeros(out, real - pos)

    def copy_at(
        self, offset: int, size: int, out: BinaryIO, sparse: SparseMap | None = None
    ) -> None:
        """Copy the ``size`` bytes at stream ``offset`` (ahead of what was read) to ``out``.

        For a second pass that knows where each body is (:attr:`Header.offset`
        from the first): what lies before is read and dropped unparsed. The
        block before ``offset`` must still be a regular file's ustar header
        (the body of a PAX or GNU entry never starts where a file's does), a
        cheap check that the stream is the one the offsets came from. For a
        sparse file (``sparse``, :attr:`Header.sparse`; ``size`` its real
        size) the block before may be its map, so only the position is checked.
        """
        here = self.size - (len(self._buf) - self._pos)
        if offset - (BLOCK if sparse is None else 0) < here:
            raise LayerError(f"{self._where}: body offset {offset} is behind the stream at {here}")
        if sparse is None:
            self._skip(offset - BLOCK - here)
            block = self._read(BLOCK)
            if block is None or block[156:157] not in _REGULAR_FLAGS:
                raise LayerError(
                    f"{self._where}: no regular file's header before offset {offset}; the layer "
                    "differs from the one scanned (the blob changed under us)"
                )
            self._data_left = self._body_left = size
            self._copy(size, out)
        else:
            self._skip(offset - here)
            self._data_left = self._body_left = sum(length for _, length in sparse)
            self._expand(sparse, size, out)
        self._body_left -= self._data_left
        self._data_left = 0

    def hexdigest(self) -> str:
        """sha256 of every byte read so far (the whole stream once iteration ended)."""
        assert self._hash is not None, "reader was created with hash_stream=False"
        return self._hash.hexdigest()

    def drain(self) -> None:
        """Read (and hash) whatever follows the end-of-archive marker."""
        self._buf, self._pos = b"", 0
        while self._fill():
            self._buf, self._pos = b"", 0

    def __iter__(self) -> Iterator[Header]:
        ordinal = 0
        pax_global: dict[str, bytes] = {}
        pax: dict[str, bytes] = {}
        long_name: bytes | None = None
        long_link: bytes | None = None
        while True:
            if self._body_left:
                self._skip(self._body_left)
                self._body_left = self._data_left = 0
            block = self._read(BLOCK)
            if block is None:
                return  # EOF at a header boundary: accepted, as Go's archive/tar does
            if block == _ZERO_BLOCK:
                self._read(BLOCK)  # the second zero block (absent in some writers)
                return
            where = self._where  # the entry number is added where an error is raised
            numbers = _plain_numbers(block)
            if numbers is None or _sum(block) - sum(block[148:156]) + 256 != numbers[5]:
                # The slow way; the other fields only for an entry (_header): a PAX or
                # GNU header's fields beyond these two are read by nobody.
                self._check_sum(block, ordinal)
                numbers = None
                size = _parse_number(block[124:136], "size", where)
            else:
                size = numbers[3]
            typeflag = block[156:157]
            if typeflag in (_PAX_LOCAL, _PAX_GLOBAL, _GNU_LONGNAME, _GNU_LONGLINK):
                data = self._read_block_payload(size, ordinal)
                if typeflag == _PAX_LOCAL:
                    pax.update(_parse_pax(data, f"{where}, entry {ordinal}"))
                elif typeflag == _PAX_GLOBAL:
                    pax_global.update(_parse_pax(data, f"{where}, entry {ordinal}"))
                elif typeflag == _GNU_LONGNAME:
                    long_name = data.rstrip(b"\0")
                else:
                    long_link = data.rstrip(b"\0")
                continue
            records = {**pax_global, **pax} if pax_global else pax
            offset = self.size - (len(self._buf) - self._pos)
            header = self._header(
                block, numbers, ordinal, records, long_name, long_link, where, offset
            )
            pax, long_name, long_link = {}, None, None
            # Header-only types carry no data whatever their size field says (Go's
            # archive/tar, which containerd and docker use, reads them that way).
            stored = header.size  # 0 unless a regular file
            if header.sparse is not None:
                stored = self._sparse(header, block, records)
            else:
                self._fragments = None
            body = stored if header.typeflag == REGULAR else 0 if typeflag in _HEADER_ONLY else size
            self._data_left = stored
            self._body_left = body + (-body % BLOCK)
            ordinal += 1
            if typeflag == _GNU_VOLUME:
                continue
            yield header

    def _check_sum(self, block: bytes, ordinal: int) -> None:
        where = f"{self._where}, entry {ordinal}"
        field = block[148:156]
        stored = _parse_number(field, "checksum", where)
        unsigned = sum(block) - sum(field) + 256  # the field counts as spaces
        if stored != unsigned:
            # Some historic writers summed signed chars; accept that form too.
            signed = unsigned - 2 * sum(b for b in block if b >= 128)
            if stored != signed:
                raise LayerError(f"{where}: corrupt tar header (checksum mismatch)")

    def _header(
        self,
        block: bytes,
        numbers: list[int] | None,
        ordinal: int,
        pax: dict[str, bytes],
        long_name: bytes | None,
        long_link: bytes | None,
        where: str,
        offset: int,
    ) -> Header:
        typeflag = block[156:157]
        sparse: SparseMap | None = None
        if typeflag == _GNU_SPARSE or (pax and _sparse_format(pax, where, ordinal) is not None):
            sparse, typeflag = _UNREAD, REGULAR  # the map is read by TarReader._sparse
        if typeflag == _GNU_MULTIVOL:
            raise LayerError(
                f"{where}, entry {ordinal}: multi-volume tar entries are not supported"
            )
        if typeflag in _REGULAR_FLAGS:
            typeflag = REGULAR
        elif typeflag == _GNU_DUMPDIR:
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
                _parse_number(f, what, where)
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
                size = _pax_int(value, key, where)
            elif key == "uid":
                uid = _pax_int(value, key, where)
            elif key == "gid":
                gid = _pax_int(value, key, where)
            elif key == "mtime":
                mtime = _pax_int(value, key, where)
            elif key.startswith(_XATTR_PREFIX):
                xattrs.append((key[len(_XATTR_PREFIX) :], value))
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

    # -- sparse files ------------------------------------------------------------------

    def _sparse(self, header: Header, block: bytes, pax: dict[str, bytes]) -> int:
        """Read and check the map of sparse ``header``; the length of its stored data.

        Sets the header's real size, map and data offset. The map is header
        data, so its encoded size is held to ``max_header_bytes``; the holes
        count against ``max_bytes`` like the stream's own bytes, so a small
        layer cannot make a huge file.
        """
        where = f"{self._where}, entry {header.ordinal} ({header.name!r})"
        stored = header.size
        if block[156:157] == _GNU_SPARSE:
            real, fragments = self._gnu_map(block, where)
        else:
            sized = pax.get("GNU.sparse.size", pax.get("GNU.sparse.realsize"))
            real = stored if sized is None else _pax_int(sized, "GNU.sparse.size", where)
            if _sparse_format(pax, where, header.ordinal) == 1:
                fragments, used = self._map_1_0(stored, where)
                stored -= used
            else:
                fragments = _map_0_x(pax, where)
        kept = _check_map(fragments, real, stored, where)
        self._holes += real - stored
        if self.size + self._holes > self._max_bytes:
            self._too_big(where)
        header.size, header.sparse = real, kept
        header.offset = self.size - (len(self._buf) - self._pos)
        self._fragments, self._real = kept, real
        return stored

    def _gnu_map(self, block: bytes, where: str) -> tuple[int, list[tuple[int, int]]]:
        """The old GNU format: 4 fragments in the header, 21 in each extension block."""
        if block[257:265] != _GNU_MAGIC:
            # STAR uses the same type flag for another layout; Go refuses it too.
            raise LayerError(f"{where}: a sparse ('S') entry outside the GNU tar format")
        real = _parse_number(block[483:495], "realsize", where)
        fragments: list[tuple[int, int]] = []
        _gnu_fragments(block, 386, 4, fragments, where)
        extended, spent = block[482], 0
        while extended:
            ext = self._map_block(spent, where)
            spent += BLOCK
            _gnu_fragments(ext, 0, 21, fragments, where)
            extended = ext[504]
        return real, fragments

    def _map_block(self, used: int, where: str) -> bytes:
        """The next block of a sparse map of which ``used`` bytes were read before it."""
        if used + BLOCK > self._max_header_bytes:
            raise LimitExceeded(
                f"{where}: a sparse map of over {self._max_header_bytes} bytes exceeds "
                "Limits.max_header_bytes"
            )
        block = self._read(BLOCK)
        if block is None:
            raise LayerError(f"{where}: tar stream ends inside a sparse map")
        return block

    def _map_1_0(self, stored: int, where: str) -> tuple[list[tuple[int, int]], int]:
        """Format 1.0: decimal lines at the start of the data (count, then offset and
        length per fragment), padded to a block; the map and the blocks it used."""
        data = bytearray()
        lines, wanted = 0, 1
        while lines < wanted:
            if len(data) + BLOCK > stored:
                raise LayerError(f"{where}: the sparse map runs past the entry's data")
            block = self._map_block(len(data), where)
            data += block
            lines += block.count(b"\n")
            if wanted == 1 and lines:
                count = _decimal(bytes(data).split(b"\n", 1)[0], where)
                wanted = 1 + 2 * count
        numbers = [_decimal(n, where) for n in bytes(data).split(b"\n", wanted)[1:wanted]]
        return list(zip(numbers[::2], numbers[1::2], strict=True)), len(data)


# -- writing ---------------------------------------------------------------------


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
    return b"%s%06o\0 %s" % (head, _sum(head) + _sum(tail) + 256, tail)


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
        records.append(pax_record(_XATTR_PREFIX.encode() + key.encode(), value))
    out = b""
    if records:
        data = b"".join(records)
        out = _block(
            _PAX_NAME, b"", _PAX_LOCAL, mode=0o644, uid=0, gid=0, size=len(data), mtime=0,
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
