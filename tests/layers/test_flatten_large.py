"""Files of 8 GiB and more (past ustar's 11-digit octal size field) go through flatten intact.

A synthetic stream, not a real file: the layer is a header and a body of
zeros made on the fly, so the test needs neither 8 GiB of memory nor of disk.
"""

from __future__ import annotations

import hashlib
import io

import pytest

from hypeman_images.layers.emit import write_tar
from hypeman_images.layers.merge import merge
from hypeman_images.layers.scan import scan_layer
from hypeman_images.layers.tar import REGULAR
from hypeman_images.layers.tarread import TarReader
from hypeman_images.layers.tarwrite import END_OF_ARCHIVE, encode_header, padding

SIZE = (8 << 30) + 12345  # one past the octal limit of ustar's size field, and then some
CHUNK = 1 << 20


class SyntheticLayer(io.RawIOBase):
    """``big`` (SIZE zero bytes except a marker at the end), as an uncompressed tar stream."""

    MARKER = b"end of the big file"

    def __init__(self) -> None:
        header = encode_header(b"big", REGULAR, size=SIZE, mode=0o644)
        tail = self.MARKER + padding(SIZE) + END_OF_ARCHIVE
        self._parts = [(header, 0), (b"", SIZE - len(self.MARKER)), (tail, 0)]
        self._index = 0
        self._offset = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while self._index < len(self._parts):
            data, zeros = self._parts[self._index]
            length = len(data) or zeros
            if self._offset < length:
                n = min(len(buffer), length - self._offset)
                if data:
                    buffer[:n] = data[self._offset : self._offset + n]
                else:
                    buffer[:n] = bytes(n)
                self._offset += n
                return n
            self._index += 1
            self._offset = 0
        return 0


class HashingSink(io.RawIOBase):
    """Counts and hashes what write_tar emits, keeping none of it."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.count = 0
        self.head = b""

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        if len(self.head) < 4096:
            self.head += bytes(data[: 4096 - len(self.head)])
        self.hash.update(data)
        self.count += len(data)
        return len(data)


@pytest.mark.slow
def test_file_over_8_gib_streams_through_scan_merge_and_emit() -> None:
    scan = scan_layer(io.BufferedReader(SyntheticLayer(), CHUNK), 0, name="synthetic")
    tree = merge([scan])
    assert tree.stats.regular_bytes == SIZE
    sink = HashingSink()
    write_tar(tree, lambda _: io.BufferedReader(SyntheticLayer(), CHUNK), sink)  # type: ignore[arg-type]
    # The emitted stream is the same tar again: root dir, then the file with its PAX size.
    assert b"size=%d" % SIZE in sink.head
    reader = TarReader(
        io.BytesIO(sink.head), where="out", max_bytes=1 << 40, max_header_bytes=1 << 20
    )
    big = next(h for h in reader if h.name.rstrip(b"/") not in (b"", b"."))  # stops at its header
    assert (big.name, big.size) == (b"big", SIZE)
    # The whole body arrived: header blocks + SIZE bytes + padding + end of archive.
    assert sink.count > SIZE
