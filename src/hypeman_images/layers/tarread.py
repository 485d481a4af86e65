"""Reading tar streams: :class:`TarReader` walks one front to back, hashing every byte.

The diff_id is the sha256 of the uncompressed stream (image-spec
``config.md#layer-diffids``), so every byte read is hashed. Each logical
entry becomes one :class:`tarheader.Header` numbered by its ``ordinal``, with
the ``offset`` of its body; the two-pass path (:mod:`emit`) finds the body
again by that offset on its second pass (:meth:`TarReader.copy_at`). Bodies
are skipped or copied in large chunks and never held whole in memory. Sparse
files (:mod:`tarsparse`) come out as regular files of their real size, the
holes put back as zeros (:meth:`TarReader.copy_body`).

References: POSIX.1-2008 ``pax``; GNU tar manual "Basic Tar Format" and
"Storing Sparse Files"; libarchive ``tar(5)``; Go ``archive/tar/reader.go``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import BinaryIO

from hypeman_images.errors import LayerError, LimitExceeded
from hypeman_images.layers.tar import (
    BLOCK,
    BLOCKDEV,
    CHAR,
    DIRECTORY,
    FIFO,
    GNU_LONGLINK,
    GNU_LONGNAME,
    GNU_SPARSE,
    GNU_VOLUME,
    HARDLINK,
    PAX_GLOBAL,
    PAX_LOCAL,
    REGULAR,
    SYMLINK,
    block_sum,
    parse_number,
)
from hypeman_images.layers.tarheader import (
    REGULAR_FLAGS,
    Header,
    check_sum,
    decode_header,
    parse_pax,
    pax_int,
    plain_numbers,
)
from hypeman_images.layers.tarsparse import (
    SparseMap,
    check_map,
    gnu_map,
    map_0_x,
    map_1_0,
    sparse_format,
)

_ZERO_BLOCK = b"\0" * BLOCK
_CHUNK = 1 << 20
_ZEROS = memoryview(bytes(_CHUNK))  # the holes of sparse files, written a chunk at a time
_HEADER_ONLY = (HARDLINK, SYMLINK, CHAR, BLOCKDEV, DIRECTORY, FIFO)


def _write_zeros(out: BinaryIO, n: int) -> None:
    while n > 0:
        take = min(n, _CHUNK)
        out.write(_ZEROS[:take])
        n -= take


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
        self._seek_body(offset, size, sparse)
        if sparse is None:
            self._copy(size, out)
        else:
            self._expand(sparse, size, out)
        self._body_left -= self._data_left
        self._data_left = 0

    def body_at(
        self, offset: int, size: int, sparse: SparseMap | None = None
    ) -> Iterator[memoryview]:
        """The body :meth:`copy_at` would copy, as chunks for a consumer that pulls.

        A sparse file's stored fragments come out one after another, without
        the holes: for a disk format with holes of its own (the EROFS writer's
        ``Entry.sparse``). Positions itself on the first ``next()``; consume it
        whole before reading on.
        """
        yield from self._chunks(self._seek_body(offset, size, sparse))

    def body(self) -> Iterator[memoryview]:
        """The current entry's data as chunks, as :meth:`body_at` gives a body.

        For a consumer that pulls, during the iteration step that yielded the
        entry: a sparse file's stored fragments one after another, without the
        holes. Consume it whole before reading on.
        """
        return self._chunks(self._data_left)

    def _chunks(self, left: int) -> Iterator[memoryview]:
        while left > 0:
            if self._pos >= len(self._buf) and not self._fill():
                raise LayerError(f"{self._where}: tar stream is truncated inside a file body")
            take = min(left, len(self._buf) - self._pos)
            chunk = memoryview(self._buf)[self._pos : self._pos + take]
            self._pos += take
            left -= take
            yield chunk
        self._body_left -= self._data_left
        self._data_left = 0

    def _seek_body(self, offset: int, size: int, sparse: SparseMap | None) -> int:
        """Skip to the body at ``offset`` (see :meth:`copy_at`); the bytes stored there."""
        here = self.size - (len(self._buf) - self._pos)
        if offset - (BLOCK if sparse is None else 0) < here:
            raise LayerError(f"{self._where}: body offset {offset} is behind the stream at {here}")
        if sparse is None:
            self._skip(offset - BLOCK - here)
            block = self._read(BLOCK)
            if block is None or block[156:157] not in REGULAR_FLAGS:
                raise LayerError(
                    f"{self._where}: no regular file's header before offset {offset}; the layer "
                    "differs from the one scanned (the blob changed under us)"
                )
            self._data_left = self._body_left = size
        else:
            self._skip(offset - here)
            self._data_left = self._body_left = sum(length for _, length in sparse)
        return self._data_left

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
            numbers = plain_numbers(block)
            if numbers is None or block_sum(block) - sum(block[148:156]) + 256 != numbers[5]:
                # The slow way; the other fields only for an entry (decode_header): a PAX or
                # GNU header's fields beyond these two are read by nobody.
                check_sum(block, f"{where}, entry {ordinal}")
                numbers = None
                size = parse_number(block[124:136], "size", where)
            else:
                size = numbers[3]
            typeflag = block[156:157]
            if typeflag in (PAX_LOCAL, PAX_GLOBAL, GNU_LONGNAME, GNU_LONGLINK):
                data = self._read_block_payload(size, ordinal)
                if typeflag == PAX_LOCAL:
                    pax.update(parse_pax(data, f"{where}, entry {ordinal}"))
                elif typeflag == PAX_GLOBAL:
                    pax_global.update(parse_pax(data, f"{where}, entry {ordinal}"))
                elif typeflag == GNU_LONGNAME:
                    long_name = data.rstrip(b"\0")
                else:
                    long_link = data.rstrip(b"\0")
                continue
            records = {**pax_global, **pax} if pax_global else pax
            offset = self.size - (len(self._buf) - self._pos)
            header = decode_header(
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
            if typeflag == GNU_VOLUME:
                continue
            yield header

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
        if block[156:157] == GNU_SPARSE:
            real, fragments = gnu_map(block, where, self._map_block)
        else:
            sized = pax.get("GNU.sparse.size", pax.get("GNU.sparse.realsize"))
            real = stored if sized is None else pax_int(sized, "GNU.sparse.size", where)
            if sparse_format(pax, where, header.ordinal) == 1:
                fragments, used = map_1_0(stored, where, self._map_block)
                stored -= used
            else:
                fragments = map_0_x(pax, where)
        kept = check_map(fragments, real, stored, where)
        self._holes += real - stored
        if self.size + self._holes > self._max_bytes:
            self._too_big(where)
        header.size, header.sparse = real, kept
        header.offset = self.size - (len(self._buf) - self._pos)
        self._fragments, self._real = kept, real
        return stored

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
