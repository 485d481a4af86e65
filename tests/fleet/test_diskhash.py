"""The whole disk's sha256 fed in order from pieces landing out of order (fleet/diskhash.py)."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from hypeman_images.fleet.diskhash import DiskHash, HashStopped
from hypeman_images.oci.digest import Digest

PIECE = 4096
CHUNK = 4 * PIECE


def _disk(tmp_path: Path, chunks: int) -> tuple[int, bytes]:
    data = b"".join(
        bytes(PIECE) if i % 3 == 1 else os.urandom(PIECE) for i in range(chunks * CHUNK // PIECE)
    )
    fd = os.open(tmp_path / "disk", os.O_RDWR | os.O_CREAT)
    os.pwrite(fd, data, 0)
    return fd, data


def _land(disk_hash: DiskHash, data: bytes, index: int, attempt: int) -> None:
    for offset in range(index * CHUNK, (index + 1) * CHUNK, PIECE):
        piece = data[offset : offset + PIECE]
        disk_hash.landed(index, attempt, offset, piece, piece == bytes(PIECE))


def _run(disk_hash: DiskHash) -> tuple[threading.Thread, list[Digest | BaseException]]:
    out: list[Digest | BaseException] = []

    def run() -> None:
        try:
            out.append(disk_hash.run())
        except BaseException as exc:  # handed to the test
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


@pytest.mark.parametrize("hold", [0, PIECE, 1 << 20], ids=["read-back", "one-piece", "memory"])
def test_chunks_landing_backwards_hash_to_the_disk(tmp_path: Path, hold: int) -> None:
    """Whatever the order and the memory allowed, the digest is the disk's."""
    fd, data = _disk(tmp_path, 3)
    try:
        written: list[bool] = []
        disk_hash = DiskHash(
            fd, [(i * CHUNK, CHUNK) for i in range(3)], hold=hold,
            on_written=lambda: written.append(True),
        )  # fmt: skip
        thread, out = _run(disk_hash)
        for index in (2, 1, 0):
            _land(disk_hash, data, index, disk_hash.restart(index))
            disk_hash.sealed(index)
        thread.join(10)
        assert out == [Digest("sha256", hashlib.sha256(data).hexdigest())]
        assert written == [True]
    finally:
        os.close(fd)


def test_an_unsealed_chunk_holds_the_hash_and_a_retry_rewinds_it(tmp_path: Path) -> None:
    """Pieces of a chunk whose digest is not checked yet may be hashed, but a retry
    puts the hash back to the chunk's start: the digest is of the retry's bytes."""
    fd, data = _disk(tmp_path, 2)
    try:
        disk_hash = DiskHash(fd, [(0, CHUNK), (CHUNK, CHUNK)])
        thread, out = _run(disk_hash)
        first = disk_hash.restart(0)
        _land(disk_hash, bytes(CHUNK) + data[CHUNK:], 0, first)  # wrong bytes, hashed
        _land(disk_hash, data, 1, disk_hash.restart(1))
        disk_hash.sealed(1)
        assert not out  # chunk 0 is not sealed: the hash waits at its end
        again = disk_hash.restart(0)
        _land(disk_hash, data, 0, first)  # a straggler of the first try: ignored
        _land(disk_hash, data, 0, again)
        disk_hash.sealed(0)
        thread.join(10)
        assert out == [Digest("sha256", hashlib.sha256(data).hexdigest())]
    finally:
        os.close(fd)


def test_fail_stops_the_hash(tmp_path: Path) -> None:
    fd, _ = _disk(tmp_path, 1)
    try:
        disk_hash = DiskHash(fd, [(0, CHUNK)])
        thread, out = _run(disk_hash)
        disk_hash.fail()
        thread.join(10)
        assert len(out) == 1 and isinstance(out[0], HashStopped)
    finally:
        os.close(fd)
