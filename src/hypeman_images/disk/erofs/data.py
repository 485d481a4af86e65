"""The data area: file bodies written as they arrive, in large sequential writes.

The image starts with the superblock's block; file data follows from block 1
in the order the caller adds files, each file's blocks contiguous
(``EROFS_INODE_FLAT_PLAIN`` / ``FLAT_INLINE``) or, for a sparse file, its
non-hole chunks contiguous (``EROFS_INODE_CHUNK_BASED``). Small writes are
gathered in a buffer and written from a thread; runs of zeros inside a
sparse file's chunks are skipped, so they stay holes in the output file too.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

from hypeman_images.disk.erofs.format import BLOCK_BITS, BLOCK_SIZE, round_up
from hypeman_images.disk.erofs.model import ErofsInputError, SparseMap
from hypeman_images.errors import StorageError

# A read-only memoryview (of bytes) is taken as it is; other chunks are copied.
Body = BinaryIO | Iterable[bytes | memoryview]

_BUFFER = 4 << 20  # gather writes up to this much
_DIRECT = 256 << 10  # an immutable chunk this large is written as it is, not gathered
_IN_FLIGHT = 8  # writes handed to the writing thread and not yet done
_READ = 1 << 20  # read bodies this much at a time
_SEEK_OVER = 64 << 10  # zero runs at least this long become holes
_ZEROS = bytes(_SEEK_OVER)
_MAX_CHUNK_BITS = 18  # 1 GiB chunks at most (EROFS_CHUNK_FORMAT_BLKBITS_MASK allows 31)


class DataArea:
    """A sequential writer from a block boundary, tracking its position.

    The output is emptied first: runs of zeros are skipped, which read as
    zeros only in a file that held nothing there before. Gathered buffers go
    to the file from a thread of their own, a few at a time, so the caller
    makes the next one while the kernel copies the last (the write releases
    the GIL); :meth:`flush` waits for them all. Nothing else may use ``out``
    until then, and :meth:`close` ends the thread.
    """

    def __init__(self, out: BinaryIO, start: int) -> None:
        self._out = out
        self._buf = bytearray()
        self.pos = start  # where the next byte lands, buffer included
        self._writes: deque[Future[None]] = deque()
        try:
            out.seek(0)
            out.truncate(0)
        except OSError as exc:
            raise StorageError(f"erofs: cannot empty the output: {exc}") from exc
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="erofs-write")

    @property
    def block(self) -> int:
        """The block the next byte lands in (call at a block boundary)."""
        return self.pos >> BLOCK_BITS

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data``."""
        n = len(data)
        if n >= _DIRECT and _frozen(data):  # no copy: nobody changes it while it is written
            self._hand_off()
            self._submit(self.pos, data)
        elif n >= _BUFFER:
            self._hand_off()
            self._submit(self.pos, bytes(data))
        else:
            self._buf += data
        self.pos += n
        if len(self._buf) >= _BUFFER:
            self._hand_off()

    def zeros(self, n: int) -> None:
        """Append ``n`` zero bytes; long runs are left as a hole (nothing written there)."""
        if n < _SEEK_OVER:
            self.write(_ZEROS[:n])
            return
        self._hand_off()
        self.pos += n

    def pad_block(self) -> None:
        """Zero-fill to the next block boundary."""
        self.zeros(-self.pos % BLOCK_SIZE)

    def write_at(self, pos: int, data: bytes) -> None:
        """Write ``data`` at ``pos``, before the area's start (the superblock's block).

        On the writing thread like every other write, so that only that thread
        moves the file's position while it runs.
        """
        self._submit(pos, data)

    def flush(self) -> None:
        """Write out what is gathered, wait until every write is done, flush ``out``.

        The bytes are then in the file, where another reader of it sees them.
        """
        self._hand_off()
        while self._writes:
            self._wait_one()
        try:
            self._out.flush()
        except OSError as exc:
            raise StorageError(f"erofs: cannot write the image: {exc}") from exc

    def close(self) -> None:
        """End the writing thread (after :meth:`flush`, or to abandon the image)."""
        for write in self._writes:
            write.cancel()
        self._thread.shutdown(wait=True)

    def _hand_off(self) -> None:
        if self._buf:
            self._submit(self.pos - len(self._buf), self._buf)
            self._buf = bytearray()

    def _submit(self, pos: int, data: bytes | bytearray | memoryview) -> None:
        self._writes.append(self._thread.submit(self._write_at, pos, data))
        while len(self._writes) > _IN_FLIGHT:
            self._wait_one()

    def _wait_one(self) -> None:
        try:
            self._writes.popleft().result()
        except OSError as exc:
            raise StorageError(f"erofs: cannot write the image: {exc}") from exc

    def _write_at(self, pos: int, data: bytes | bytearray | memoryview) -> None:
        self._out.seek(pos)
        self._out.write(data)


class BodyReader:
    """Exactly ``size`` bytes from a file object or an iterable of chunks.

    Chunks are handed on as memoryview slices, never copied, so a large
    chunk costs one write whatever the reads are cut into.
    """

    def __init__(self, body: Body, size: int, where: str) -> None:
        self._chunks = _chunks(body)
        self._left = size
        self._pending = memoryview(b"")
        self._where = where

    def read(self, n: int) -> memoryview:
        """Up to ``n`` bytes (fewer only at a chunk's end); refuses a short body."""
        if not self._pending:
            self._pending = memoryview(next(self._chunks, b""))
            if not self._pending:
                raise ErofsInputError(f"{self._where}: body ended {self._left} bytes early")
        out, self._pending = self._pending[:n], self._pending[n:]
        self._left -= len(out)
        return out

    def copy(self, n: int, area: DataArea) -> None:
        """Move ``n`` bytes of the body into the data area."""
        while n:
            chunk = self.read(n)
            area.write(chunk)
            n -= len(chunk)

    def take(self, n: int) -> bytes:
        """``n`` bytes of the body, in memory."""
        parts = []
        while n:
            parts.append(self.read(n))
            n -= len(parts[-1])
        return b"".join(parts)

    def close(self) -> None:
        """Refuse a body longer than its entry said."""
        if self._pending or any(self._chunks):
            raise ErofsInputError(f"{self._where}: body longer than its size")


def _chunks(body: Body) -> Iterator[bytes | memoryview]:
    if isinstance(body, bytes | bytearray):
        raise TypeError("a body is a file object or an iterable of chunks, not bytes")
    read = getattr(body, "read", None)
    if read is None:
        yield from (c if _frozen(c) else bytes(c) for c in body if c)
        return
    while chunk := read(_READ):
        yield chunk


def _frozen(chunk: bytes | bytearray | memoryview) -> bool:
    return type(chunk) is bytes or (isinstance(chunk, memoryview) and chunk.readonly)


def chunk_bits(sparse: SparseMap, size: int) -> int:
    """The chunk size (``BLOCK_SIZE << bits``) that stores a sparse file in the fewest bytes.

    Each chunk is either a hole (``EROFS_NULL_ADDR`` in the 4-byte block map)
    or written whole, zeros included, up to the file's last block: larger
    chunks shrink the map but write more zeros around the data.
    """
    best, best_cost = 0, -1
    for bits in range(_MAX_CHUNK_BITS + 1):
        shift = BLOCK_BITS + bits
        if bits and (1 << (shift - 1)) >= size:
            break
        chunks = data_chunks(sparse, shift)
        written = sum(_chunk_len(c, shift, size) for c in chunks)
        cost = 4 * (-(-size >> shift)) + written
        if best_cost < 0 or cost < best_cost:
            best, best_cost = bits, cost
    return best


def data_chunks(sparse: SparseMap, shift: int) -> list[int]:
    """The indexes of the chunks (``1 << shift`` bytes) that hold data, ascending."""
    out: list[int] = []
    for offset, length in sparse:
        if not length:
            continue
        first, last = offset >> shift, (offset + length - 1) >> shift
        start = max(first, out[-1] + 1) if out else first
        out.extend(range(start, last + 1))
    return out


def _chunk_len(index: int, shift: int, size: int) -> int:
    """The bytes a data chunk takes on disk: whole, or up to the last block of the file."""
    start = index << shift
    return min(1 << shift, round_up(size, BLOCK_SIZE) - start)


def write_sparse(
    reader: BodyReader, sparse: SparseMap, size: int, shift: int, area: DataArea
) -> dict[int, int]:
    """Write a sparse file's data chunks; returns chunk index -> block address."""
    addrs: dict[int, int] = {}
    chunk, at = -1, 0  # the chunk being written, and the file offset written up to
    for offset, length in sparse:
        pos, end = offset, offset + length
        while pos < end:
            index = pos >> shift
            if index != chunk:
                if chunk >= 0:
                    area.zeros((chunk << shift) + _chunk_len(chunk, shift, size) - at)
                chunk, at = index, index << shift
                addrs[index] = area.block
            area.zeros(pos - at)
            n = min(end, (index + 1) << shift) - pos
            reader.copy(n, area)
            pos = at = pos + n
    if chunk >= 0:
        area.zeros((chunk << shift) + _chunk_len(chunk, shift, size) - at)
    return addrs


def truncate(out: BinaryIO, size: int) -> None:
    """Set the image file's length (the data area may end in a hole)."""
    try:
        out.truncate(size)
        out.flush()
    except OSError as exc:
        raise StorageError(f"erofs: cannot size the image: {exc}") from exc
