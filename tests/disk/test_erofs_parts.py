"""The EROFS writer's parts on their own: checksum, slots, chunk sizes, dirent blocks."""

from __future__ import annotations

import pytest
from support.erofs_reader import crc32c_linux

from hypeman_images.disk.erofs import dirs
from hypeman_images.disk.erofs.checksum import crc32c_raw
from hypeman_images.disk.erofs.data import chunk_bits, data_chunks
from hypeman_images.disk.erofs.layout import MetaSpace
from hypeman_images.disk.erofs.xattrs import SharedXattrs, split_name


def test_crc32c_matches_rfc3720_and_linux() -> None:
    assert crc32c_raw(b"123456789") ^ 0xFFFFFFFF == 0xE3069283  # the standard check value
    assert crc32c_raw(bytes(32)) ^ 0xFFFFFFFF == 0x8A9136AA  # RFC 3720 B.4, 32 zero bytes
    data = bytes(range(256)) * 12
    assert crc32c_raw(data) == crc32c_linux(data)


def test_slots_best_fit_and_never_split() -> None:
    space = MetaSpace()
    assert space.place(32) == 0
    assert space.place(4080) == 4096  # 128 slots do not fit after slot 0: a new block
    assert space.place(64) == 32
    assert space.place(33) == 96  # rounded up to two slots
    assert space.place(5000) == 2 * 4096  # larger than a block: starts one, spans two
    assert space.place(99 * 32) == 3 * 4096 + 29 * 32  # best fit: the spanning record's rest
    assert space.place(32) == 160
    assert space.blocks == 4


def test_slots_fill_blocks_densely() -> None:
    space = MetaSpace()
    offsets = [space.place(n) for n in [64, 2000, 3000, 1000, 32, 3000, 96] * 50]
    assert len(set(offsets)) == len(offsets)
    assert all(o % 32 == 0 for o in offsets)
    used = sum(-(-n // 32) * 32 for n in [64, 2000, 3000, 1000, 32, 3000, 96]) * 50
    assert space.blocks * 4096 < used * 1.15


@pytest.mark.parametrize(
    ("sparse", "size", "bits"),
    [
        (((0, 1),), 1, 0),
        (((0, 10), ((5 << 30) - 10, 10)), 5 << 30, 5),  # map 160 KiB + 256 KiB of chunks
        (((0, 4096 * 300),), 4096 * 300, 9),  # one 2 MiB chunk beats a 300-entry map
        ((), 1 << 40, 18),  # all hole: the largest chunks
    ],
)
def test_chunk_size_is_the_cheapest(
    sparse: tuple[tuple[int, int], ...], size: int, bits: int
) -> None:
    assert chunk_bits(sparse, size) == bits


def test_data_chunks_merge_fragments() -> None:
    assert data_chunks(((0, 10), (20, 10), (4096, 1), (3 * 4096 - 1, 2)), 12) == [0, 1, 2, 3]
    assert data_chunks(((0, 0), (8192, 0)), 12) == []


def test_dirent_blocks_never_split_a_name() -> None:
    names = [b"n%04d" % i + b"x" * 200 for i in range(100)]
    layout = dirs.plan([b".", b"..", *names])
    assert layout.names[:2] == (b".", b"..")
    for start, end in layout.blocks:
        assert sum(12 + len(n) for n in layout.names[start:end]) <= 4096
    assert layout.blocks[-1][1] == 102 and layout.size == (len(layout.blocks) - 1) * 4096 + sum(
        12 + len(n) for n in layout.names[layout.blocks[-1][0] :]
    )


def test_xattr_sharing_counts_pairs_not_names() -> None:
    a, b, c = (1, b"a", b"1"), (1, b"a", b"2"), (6, b"capability", b"cap")
    shared = SharedXattrs()
    for items in [(a, c), (b, c), (a,)]:
        shared.count(items)
    shared.seal()
    assert shared.ibody_size((a, c)) == 12 + 4 + 4
    assert shared.ibody_size((b,)) == 12 + 8
    assert split_name(b"system.posix_acl_access", "") == (2, b"")
    assert split_name(b"security.capability", "") == (6, b"capability")
