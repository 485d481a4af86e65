"""The independent reader catches what it is there to catch (it checks the writer)."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from support.erofs_check import write
from support.erofs_reader import CorruptImage, crc32c_linux, read_image

from hypeman_images.disk.erofs import Entry, Kind

ITEMS = [
    (Entry(b"", Kind.DIR, mode=0o755), None),
    (Entry(b"a", Kind.FILE, size=3), b"abc"),
    (Entry(b"b", Kind.FILE, size=3), b"xyz"),
    (Entry(b"d", Kind.DIR, mode=0o755), None),
]


def _sb(img: bytearray, offset: int, fmt: str, value: int) -> None:
    struct.pack_into(fmt, img, 1024 + offset, value)
    struct.pack_into("<I", img, 1028, 0)
    crc = crc32c_linux(bytes(img[1024:4096]))
    struct.pack_into("<I", img, 1028, crc)


def _root_block(img: bytearray) -> int:
    meta, root = struct.unpack_from("<I", img, 1024 + 40)[0], struct.unpack_from("<H", img, 1038)[0]
    return meta * 4096 + root * 32 + 32  # the root's inline dirents follow its compact inode


def _swap_names(img: bytearray) -> None:
    at = _root_block(img)
    names_at = struct.unpack_from("<H", img, at + 8)[0] + at  # ".", "..", "a", "b", "d"
    assert img[names_at + 3 : names_at + 5] == b"ab"
    img[names_at + 3 : names_at + 5] = b"ba"


def _nlink(img: bytearray) -> None:
    meta, root = struct.unpack_from("<I", img, 1024 + 40)[0], struct.unpack_from("<H", img, 1038)[0]
    struct.pack_into("<H", img, meta * 4096 + root * 32 + 6, 2)


MUTATIONS: dict[str, Callable[[bytearray], None]] = {
    "checksum": lambda img: img.__setitem__(1028, img[1028] ^ 1),
    "magic": lambda img: _sb(img, 0, "<I", 0xE0F5E1E3),
    "unknown incompat feature": lambda img: _sb(img, 80, "<I", 0x100),
    "inode count": lambda img: _sb(img, 8, "<Q", 9),
    "names out of order": _swap_names,
    "root nlink": _nlink,
}


@pytest.mark.parametrize("mutate", list(MUTATIONS.values()), ids=list(MUTATIONS))
def test_corruption_is_caught(tmp_path: Path, mutate: Callable[[bytearray], None]) -> None:
    img = tmp_path / "x.img"
    write(ITEMS, img)
    read_image(img)
    data = bytearray(img.read_bytes())
    mutate(data)
    img.write_bytes(bytes(data))
    with pytest.raises(CorruptImage):
        read_image(img)
