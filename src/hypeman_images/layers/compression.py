"""Decompressing readers for layer blobs: gzip (ISA-L), zstd, or none.

The media type (image-spec ``media-types.md``; Docker's equivalents) says how a
layer is compressed; the first bytes of the blob must agree. A blob whose magic
bytes contradict its media type -- say ``+gzip`` holding zstd -- is refused
with a :class:`LayerError` that names both, rather than silently decoded by its
magic as containerd's ``DecompressStream`` would: the descriptor is part of the
signed, content-addressed manifest, and a mismatch means the pusher is broken.

Corrupt or truncated compressed data becomes a :class:`LayerError` naming the
layer; the translation happens here, at the boundary, with ``raise ... from``.
"""

from __future__ import annotations

import io
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, BinaryIO, Protocol, cast

import zstandard
from isal import igzip, isal_zlib

from hypeman_images.errors import LayerError
from hypeman_images.oci.spec import LAYER_COMPRESSION

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# libzstd's own default limit for decoders (ZSTD_WINDOWLOG_LIMIT_DEFAULT = 27):
# frames that need a larger window (``zstd --long=31``) are refused unless the
# caller raises it, so a hostile frame cannot make us allocate gigabytes.
DEFAULT_ZSTD_MAX_WINDOW = 1 << 27
_DECOMPRESSION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    EOFError,
    ValueError,
    zstandard.ZstdError,
    cast("type[BaseException]", isal_zlib.IsalError),  # typed as an instance in its stub
)


def sniff(head: bytes) -> str:
    """``"gzip"``, ``"zstd"`` or ``"none"`` from a blob's first bytes."""
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if head.startswith(_ZSTD_MAGIC):
        return "zstd"
    return "none"


class _Prefixed(io.RawIOBase):
    """A stream with bytes already read from it put back in front."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self._head = head
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._rest.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._rest.close()
        super().close()


class DecompressedStream(io.RawIOBase):
    """The uncompressed bytes of one layer; decoder errors become :class:`LayerError`."""

    def __init__(
        self, inner: BinaryIO, compression: str, name: str, source: BinaryIO | None = None
    ) -> None:
        self._inner = inner
        self._source = source  # closed too: a gzip reader does not close the file it reads
        self.compression = compression
        self.name = name

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        try:
            data = self._inner.read(size)
        except _DECOMPRESSION_ERRORS as exc:
            raise LayerError(
                f"layer {self.name}: corrupt or truncated {self.compression} data: {exc}"
            ) from exc
        return bytes(data)

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            if self._source is not None:
                self._source.close()
            super().close()


class _ZstdFrames:
    """Follows the frame structure of a zstd stream as its bytes pass (RFC 8878, section 3).

    Only headers are parsed (frame header, block headers, skippable-frame
    sizes); contents are skipped. :attr:`complete` says whether the bytes seen
    so far end exactly after a whole frame. Garbage is left to the decoder.
    """

    def __init__(self) -> None:
        self._state = "magic"
        self._head = b""
        self._skip = 0
        self._checksum = False
        self._frames = 0
        self._lost = False

    @property
    def complete(self) -> bool:
        at_boundary = self._state == "magic" and not self._head and not self._skip
        return self._lost or (at_boundary and self._frames > 0)

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n and not self._lost:
            if self._skip:
                take = min(self._skip, n - i)
                self._skip -= take
                i += take
                continue
            need = {"magic": 4, "skippable": 4, "frame": 1, "block": 3}[self._state]
            take = min(need - len(self._head), n - i)
            self._head += data[i : i + take]
            i += take
            if len(self._head) == need:
                head, self._head = self._head, b""
                self._step(int.from_bytes(head, "little"))

    def _step(self, value: int) -> None:
        if self._state == "magic":
            if value == 0xFD2FB528:
                self._state = "frame"
            elif value & 0xFFFFFFF0 == 0x184D2A50:
                self._state = "skippable"
            else:
                self._lost = True  # not zstd: the decoder reports it
        elif self._state == "skippable":
            self._skip, self._state = value, "magic"
        elif self._state == "frame":  # Frame_Header_Descriptor
            single = (value >> 5) & 1
            self._checksum = bool((value >> 2) & 1)
            fcs = ((1 if single else 0), 2, 4, 8)[value >> 6]
            self._skip = (0 if single else 1) + (0, 1, 2, 4)[value & 3] + fcs
            self._state = "block"
        else:  # Block_Header: Last_Block, Block_Type, Block_Size
            block_type, size = (value >> 1) & 3, value >> 3
            self._skip = 1 if block_type == 1 else size  # RLE blocks hold one byte
            if value & 1:
                self._skip += 4 if self._checksum else 0
                self._frames += 1
                self._state = "magic"


class _Tee(io.RawIOBase):
    """A reader that shows every byte it passes on to ``watch``."""

    def __init__(self, raw: BinaryIO, watch: Callable[[bytes], None]) -> None:
        self._raw = raw
        self._watch = watch

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._watch(data)
        return data

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class _StrictZstd(io.RawIOBase):
    """zstd with bounded reads, and a truncated frame made an error.

    zstandard's ``stream_reader`` bounds each read's output (a frame of zeros
    inflates some 30,000:1, and ``decompressobj().decompress`` would return
    all of it from one call: a bomb in memory before any size limit could
    look), but returns a short read at a truncated frame; :class:`_ZstdFrames`
    watching the compressed bytes tells the two apart.
    """

    def __init__(self, raw: BinaryIO, max_window: int) -> None:
        dctx = zstandard.ZstdDecompressor(max_window_size=max_window)
        self._frames = _ZstdFrames()
        self._raw = raw
        tee = cast(BinaryIO, _Tee(raw, self._frames.feed))
        self._reader = dctx.stream_reader(
            tee, read_size=1 << 20, read_across_frames=True, closefd=False
        )

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            return b"".join(iter(lambda: self.read(1 << 20), b""))
        data = self._reader.read(size) if size else b""
        if size and not data and not self._frames.complete:
            raise EOFError("zstd stream ends inside a frame")
        return bytes(data)

    def close(self) -> None:
        self._reader.close()  # type: ignore[no-untyped-call]
        self._raw.close()
        super().close()


class Hasher(Protocol):
    """What ``hash_into`` takes: a ``hashlib`` object, say."""

    def update(self, data: bytes, /) -> None: ...


class _ReadAhead(io.RawIOBase):
    """``inner`` read in a helper thread, up to ``blocks`` blocks of 1 MiB ahead of its reader.

    ISA-L and zstd drop the GIL while they decode, so the decoding of a layer
    overlaps whatever its reader does with the bytes; so does hashlib, and
    ``hash_into`` gets every decoded byte in this thread (the one-pass build's
    diff_id: the sha256 of every uncompressed byte, off the thread that
    parses). A read of a block's size gets the block itself, not a copy. An
    error reaches the reader where it happened in the stream; closing stops
    the thread, then closes ``inner``.
    """

    BLOCK = 1 << 20

    def __init__(self, inner: BinaryIO, blocks: int, hash_into: Hasher | None = None) -> None:
        self._inner = inner
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(blocks)
        self._stop = threading.Event()
        self._block = b""
        self._pos = 0
        self._eof = False
        self._hash = hash_into
        # The hash gets a thread of its own: in the decoder's, inflate + sha256 made
        # that thread the one-pass build's slowest.
        self._hash_queue: queue.Queue[bytes] | None = None
        self._threads = [threading.Thread(target=self._decode, name="read-ahead", daemon=True)]
        if hash_into is not None:
            self._hash_queue = queue.Queue(blocks)
            self._threads.append(threading.Thread(target=self._digest, name="hash", daemon=True))
        for thread in self._threads:
            thread.start()

    def _decode(self) -> None:
        try:
            while data := self._inner.read(self.BLOCK):
                if not self._hand(data):
                    return
            self._hand(data)
        except BaseException as exc:  # the reader raises it, in its own thread
            if self._hash_queue is not None:
                self._put(self._hash_queue, b"")
            self._put(self._queue, exc)

    def _hand(self, data: bytes) -> bool:
        """A block (``b""`` at the end) to the hash thread, if any, then to the reader."""
        hashed = self._hash_queue is None or self._put(self._hash_queue, data)
        return hashed and self._put(self._queue, data)

    def _digest(self) -> None:
        assert self._hash is not None and self._hash_queue is not None
        while not self._stop.is_set():
            try:
                data = self._hash_queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if not data:
                return
            self._hash.update(data)

    def _put(self, where: queue.Queue[Any], item: bytes | BaseException) -> bool:
        """Queue ``item``; False once the reader has closed (nobody will take it)."""
        while not self._stop.is_set():
            try:
                where.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            return b"".join(iter(lambda: self.read(self.BLOCK), b""))
        if self._pos == len(self._block):
            if self._eof:
                return b""
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._eof = True
                raise item
            self._block, self._pos = item, 0
            if not item:
                self._eof = True
                return b""
        if self._pos == 0 and size >= len(self._block):
            self._pos = len(self._block)
            return self._block
        data = self._block[self._pos : self._pos + size]
        self._pos += len(data)
        return data

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            if self._eof and len(self._threads) > 1:
                self._threads[1].join()  # read to the end: let the hash finish
            self._stop.set()
            for thread in self._threads:
                thread.join()
            self._inner.close()
        super().close()


def open_decompressed(
    source: str | os.PathLike[str] | BinaryIO,
    media_type: str,
    *,
    name: str,
    zstd_max_window: int = DEFAULT_ZSTD_MAX_WINDOW,
    read_ahead: int = 0,
    hash_into: Hasher | None = None,
) -> BinaryIO:
    """A reader of the uncompressed tar inside a layer blob.

    ``source`` is a path (opened and closed with the reader) or a binary file
    object (closed with the reader), which need not be seekable, so a download
    in progress can be fed in. ``name`` (the layer's digest, say) appears in
    every error. gzip uses ISA-L. With ``read_ahead`` > 0 the decoding runs in
    a helper thread, that many 1 MiB blocks ahead of the reader (0: inline),
    and ``hash_into`` (which needs ``read_ahead``) is fed every decoded byte there.
    Concatenated gzip members and zstd frames are read through to the end.
    """
    compression = LAYER_COMPRESSION.get(media_type)
    if compression is None:
        raise LayerError(f"layer {name}: unsupported layer media type {media_type!r}")
    raw: BinaryIO = (
        open(source, "rb")  # noqa: SIM115 - closed by the returned reader
        if isinstance(source, (str, os.PathLike))
        else source
    )
    # Sniff with peek() where the reader has one (a file opened by path), so the
    # decoder reads the source directly; pipes and the like get a buffer that
    # has. Only a first read shorter than 4 bytes needs the bytes put back.
    buffered = raw if hasattr(raw, "peek") else cast(BinaryIO, io.BufferedReader(raw, 1 << 16))
    head = cast(io.BufferedReader, buffered).peek(4)[:4]
    stream = buffered
    if len(head) < 4:
        head = buffered.read(4)
        stream = cast(BinaryIO, io.BufferedReader(_Prefixed(head, buffered), 1 << 16))
    actual = sniff(head)
    if actual != compression:
        stream.close()
        raise LayerError(
            f"layer {name}: media type {media_type} says {compression} but the content is "
            f"{actual if actual != 'none' else 'not compressed (or unknown)'}; "
            "the image was pushed with a wrong mediaType"
        )
    inner: BinaryIO
    if compression == "gzip":
        inner = cast(BinaryIO, igzip.open(stream, "rb"))  # type: ignore[no-untyped-call]
    elif compression == "zstd":
        inner = cast(BinaryIO, _StrictZstd(stream, zstd_max_window))
    else:
        inner = stream
    decoded = cast(BinaryIO, DecompressedStream(inner, compression, name, stream))
    if read_ahead > 0:
        return cast(BinaryIO, _ReadAhead(decoded, read_ahead, hash_into))
    if hash_into is not None:
        raise ValueError("hash_into needs read_ahead")
    return decoded
