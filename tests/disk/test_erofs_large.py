"""EROFS images at scale: 100k entries, a file past 4 GiB."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.erofs_check import IS_ROOT, SEED, Item, check_image, mounted, write
from support.erofs_reader import read_image, read_range

from hypeman_images.disk.erofs import Entry, ErofsWriter, Kind

T = 1_700_000_000


def hundred_thousand() -> list[Item]:
    items: list[Item] = [(Entry(b"", Kind.DIR, mode=0o755, mtime=T), None)]
    for d in range(100):
        items.append((Entry(b"d%03d" % d, Kind.DIR, mode=0o755, mtime=T), None))
        for i in range(1000):
            body = b"%d/%d\n" % (d, i) * (i % 7)
            path = b"d%03d/file-%04d" % (d, i)
            items.append((Entry(path, Kind.FILE, size=len(body), mtime=T + i % 3), body))
    return items


@pytest.mark.slow  # writes, reads back and mounts 100k entries
def test_100k_entries(tmp_path: Path) -> None:
    items = hundred_thousand()
    assert len(items) > 100_000
    img = tmp_path / "many.img"
    start = time.monotonic()
    result = write(items, img)
    took = time.monotonic() - start
    assert result.inodes == len(items)
    assert took < 30, f"writing 100k entries took {took:.1f} s"
    check_image(img, items)


def _zeros_then(size: int, tail: bytes) -> Iterator[bytes]:
    chunk = bytes(8 << 20)
    left = size - len(tail)
    while left:
        n = min(left, len(chunk))
        yield chunk[:n]
        left -= n
    yield tail


@pytest.mark.slow
def test_a_dense_file_past_4gib(tmp_path: Path) -> None:
    size = (4 << 30) + 5000
    tail = b"the end"
    img = tmp_path / "big.img"
    with open(img, "wb+") as out:
        writer = ErofsWriter(out, SEED)
        writer.add(Entry(b"", Kind.DIR, mode=0o755))
        writer.add(Entry(b"big", Kind.FILE, size=size), _zeros_then(size, tail))
        writer.finish()
    subprocess.run(["fsck.erofs", str(img)], check=True, capture_output=True)
    read = read_image(img, hash_limit=0)
    big = read.tree[b"/big"]
    assert (big.size, big.extended, big.layout) == (size, True, 2)
    assert read_range(img, big, size - 100, 100) == bytes(100 - len(tail)) + tail
    if IS_ROOT:
        with mounted(img) as mnt, open(mnt / "big", "rb") as f:
            f.seek(size - 100)
            assert f.read() == bytes(100 - len(tail)) + tail
            f.seek((1 << 32) - (1 << 20))  # the block addresses past 2**32 bytes
            assert f.read(1 << 20) == bytes(1 << 20)
    os.unlink(img)
