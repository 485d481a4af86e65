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
from typing import BinaryIO, cast

import zstandard
from isal import igzip_threaded, isal_zlib

from .errors import LayerError
from .spec import LAYER_COMPRESSION

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


class _StrictZstd(io.RawIOBase):
    """zstandard's reader returns a short read at a truncated frame; make that an error."""

    def __init__(self, raw: BinaryIO, max_window: int) -> None:
        dctx = zstandard.ZstdDecompressor(max_window_size=max_window)
        self._dobj = dctx.decompressobj()
        self._dctx = dctx
        self._raw = raw
        self._pending = bytearray()
        self._pos = 0
        self._eof = False

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        want = size if size >= 0 else 1 << 62
        while len(self._pending) - self._pos < want and not self._eof:
            chunk = self._raw.read(1 << 20)
            if not chunk:
                self._eof = True
                if not self._dobj.eof:
                    raise EOFError("zstd stream ends inside a frame")
                break
            if self._pos:
                del self._pending[: self._pos]
                self._pos = 0
            while chunk:
                if self._dobj.eof:  # concatenated frames: start a new decoder
                    self._dobj = self._dctx.decompressobj()
                self._pending += self._dobj.decompress(chunk)
                chunk = self._dobj.unused_data if self._dobj.eof else b""
        out = bytes(self._pending[self._pos : self._pos + want])
        self._pos += len(out)
        return out

    def close(self) -> None:
        self._raw.close()
        super().close()


def open_decompressed(
    source: str | os.PathLike[str] | BinaryIO,
    media_type: str,
    *,
    name: str,
    zstd_max_window: int = DEFAULT_ZSTD_MAX_WINDOW,
    threads: int = 1,
) -> BinaryIO:
    """A reader of the uncompressed tar inside a layer blob.

    ``source`` is a path (opened and closed with the reader) or a binary file
    object (closed with the reader), which need not be seekable, so a download
    in progress can be fed in. ``name`` (the layer's digest, say) appears in
    every error. gzip uses ISA-L; ``threads=1`` inflates in a helper thread so
    that decompression overlaps with parsing and hashing (0 keeps it inline).
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
    head = raw.read(4)
    actual = sniff(head)
    if actual != compression:
        raw.close()
        raise LayerError(
            f"layer {name}: media type {media_type} says {compression} but the content is "
            f"{actual if actual != 'none' else 'not compressed (or unknown)'}; "
            "the image was pushed with a wrong mediaType"
        )
    stream = cast(BinaryIO, io.BufferedReader(_Prefixed(head, raw), 1 << 16))
    inner: BinaryIO
    if compression == "gzip":
        inner = cast(BinaryIO, igzip_threaded.open(stream, "rb", threads=threads))  # type: ignore[no-untyped-call]
    elif compression == "zstd":
        inner = cast(BinaryIO, _StrictZstd(stream, zstd_max_window))
    else:
        inner = stream
    return cast(BinaryIO, DecompressedStream(inner, compression, name, stream))
