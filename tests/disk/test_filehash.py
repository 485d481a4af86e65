"""disk/filehash.py: a file hashed in order while it is written; nothing left running after."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest

from hypeman_images.disk.filehash import SLICE, THREAD_NAME, FileHash
from hypeman_images.errors import StorageError
from hypeman_images.oci.digest import Digest


def sha256_of(path: Path) -> Digest:
    return Digest("sha256", hashlib.sha256(path.read_bytes()).hexdigest())


def hashing_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_file_hashed_as_it_is_written_is_its_sha256(tmp_path: Path) -> None:
    """The writer says how far the file is final after each piece; a hole reads as zeros."""
    path = tmp_path / "disk"
    path.write_bytes(b"")
    with closing(FileHash(path)) as hashing, path.open("r+b") as out:
        for n in (SLICE + 1, 7, 3 * SLICE - 5, 4096):
            out.write(os.urandom(n))
            out.flush()
            hashing.grow(out.tell())
        hashing.grow(5)  # less than said before: no harm
        out.truncate(out.tell() + 5 * SLICE + 3)
        out.write(b"after the hole")  # not final yet: at the position before the hole
        out.seek(0, os.SEEK_END)
        out.write(b"the end")
        out.flush()
        digest = hashing.digest()
    assert digest == sha256_of(path)
    assert hashing_threads() == []


@pytest.mark.parametrize("size", [0, 1, SLICE, 2 * SLICE + 17], ids=["empty", "1B", "slice", "2.x"])
def test_without_grow_the_digest_hashes_the_whole_file(tmp_path: Path, size: int) -> None:
    path = tmp_path / "disk"
    path.write_bytes(os.urandom(size))
    with closing(FileHash(path)) as hashing:
        assert hashing.digest() == sha256_of(path)


def test_bytes_said_final_before_they_are_there_are_a_storage_error(tmp_path: Path) -> None:
    """The writer broke its word: the hash would have read the wrong bytes."""
    path = tmp_path / "disk"
    path.write_bytes(os.urandom(SLICE))
    with closing(FileHash(path)) as hashing:
        hashing.grow(3 * SLICE)  # more than there is: the thread meets the end of the file
        while hashing_threads():
            time.sleep(0.01)
        os.truncate(path, 3 * SLICE)  # too late
        with pytest.raises(StorageError, match=f"disk ends at {SLICE}, before {3 * SLICE} bytes"):
            hashing.digest()
    with closing(FileHash(path)) as hashing:
        hashing.grow(SLICE)
        os.truncate(path, 10)
        with pytest.raises(StorageError, match=f"disk is 10 bytes, fewer than the {SLICE} final"):
            hashing.digest()
    assert hashing_threads() == []


def test_close_stops_a_waiting_thread_and_closes_the_file(tmp_path: Path) -> None:
    """A build that fails before the end: the thread waits for bytes that never come."""
    path = tmp_path / "disk"
    path.write_bytes(os.urandom(3 * SLICE))
    before = open_fds()
    hashing = FileHash(path)
    hashing.grow(SLICE)  # hashed, then the thread waits for more
    assert len(hashing_threads()) == 1
    hashing.close()
    hashing.close()  # idempotent
    assert hashing_threads() == [] and open_fds() == before
    with pytest.raises(ValueError, match="after digest or close"):
        hashing.grow(2 * SLICE)


def test_close_stops_the_thread_midway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It stops at the next slice, not at the end of the file said final."""
    path = tmp_path / "disk"
    slices = 4096
    path.write_bytes(b"")
    os.truncate(path, slices * SLICE)  # a hole: read as fast as memory allows
    reads = 0
    real_preadv = os.preadv

    def counted(fd: int, buffers: list[memoryview], offset: int) -> int:
        nonlocal reads
        reads += 1
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", counted)
    with closing(FileHash(path)) as hashing:
        hashing.grow(slices * SLICE)
    assert hashing_threads() == []
    assert reads < slices
