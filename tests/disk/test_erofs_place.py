"""Bodies placed before the tree (``ErofsWriter.place``, the one pass's way) and added after.

Placed in the order ``add`` would write them, they give the very image ``add``
gives; placed in another order, an image just as valid (fsck.erofs, our
reader, the kernel as root) that differs only in where the data lies.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from support.erofs_check import SEED, Item, check_image, fragments, write
from support.erofs_reader import read_range
from test_erofs_property import trees

from hypeman_images.disk.erofs import Entry, ErofsInputError, ErofsResult, ErofsWriter, Kind

Order = Callable[[list[Item]], list[Item]]


def write_placed(items: Sequence[Item], path: Path, order: Order = list) -> ErofsResult:
    """The bodies (each file's item holds what the writer reads: a sparse file's
    fragments) placed first, in ``order`` of the files; then every entry added."""
    with open(path, "wb+") as out:
        writer = ErofsWriter(out, SEED)
        files = [(e, c) for e, c in items if e.kind is Kind.FILE and c is not None]
        placed = {entry.path: writer.place(entry, io.BytesIO(c)) for entry, c in order(files)}
        for entry, _ in items:
            writer.add(entry, placed=placed.get(entry.path))
        return writer.finish()


def write_added(items: Sequence[Item], path: Path) -> None:
    """The same items through ``add`` alone, bodies as :func:`write_placed` takes them."""
    with open(path, "wb+") as out:
        writer = ErofsWriter(out, SEED)
        for entry, c in items:
            writer.add(entry, io.BytesIO(c) if entry.kind is Kind.FILE and c is not None else None)
        writer.finish()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees())
def test_placed_in_add_order_is_byte_identical(items: list[Item]) -> None:
    bodies = [(e, fragments(e, c) if c is not None else c) for e, c in items]
    with tempfile.TemporaryDirectory() as tmp:
        added, placed = Path(tmp) / "added.img", Path(tmp) / "placed.img"
        write(items, added)
        write_placed(bodies, placed)
        assert placed.read_bytes() == added.read_bytes()


def _reversed(files: list[Item]) -> list[Item]:
    return files[::-1]


T = 1_700_000_000
BIG = (4 << 30) + 5000  # past 4 GiB: an extended inode, chunked with holes
ITEMS: list[Item] = [
    (Entry(b"", Kind.DIR, mode=0o755, mtime=T), None),
    (Entry(b"d", Kind.DIR, mode=0o700, uid=7, mtime=T, xattrs=((b"user.d", b"1"),)), None),
    (Entry(b"d/small", Kind.FILE, size=10, mtime=T), b"0123456789"),
    (Entry(b"d/blocks", Kind.FILE, size=9000, mtime=T + 1), bytes(range(256)) * 35 + b"x" * 40),
    (Entry(b"d/link", Kind.HARDLINK, target=b"d/blocks"), None),
    (
        Entry(
            b"big",
            Kind.FILE,
            size=BIG,
            mtime=T,
            sparse=((0, 4096), (BIG - 100, 100)),
            xattrs=(
                (b"security.capability", bytes.fromhex("01000002" + "00200000" + "00" * 12)),
                (b"user.big", b"v" * 3000),
            ),
        ),
        b"a" * 4096 + b"b" * 100,  # its fragments (past HASH_LIMIT: read by range below)
    ),
    (Entry(b"empty", Kind.FILE, size=0, mtime=T), b""),
    (Entry(b"s", Kind.SYMLINK, target=b"d/small", mtime=T), None),
]


@pytest.mark.parametrize("order", [list, _reversed], ids=["add-order", "reversed"])
def test_placed_bodies_make_a_valid_image(order: Order, tmp_path: Path) -> None:
    added, placed = tmp_path / "added.img", tmp_path / "placed.img"
    write_placed(ITEMS, placed, order)
    write_added(ITEMS, added)
    assert (placed.read_bytes() == added.read_bytes()) is (order is list)
    read = check_image(placed, ITEMS)
    big = read.tree[b"/big"]
    assert big.extended and big.size == BIG
    assert read_range(placed, big, 0, 4097) == b"a" * 4096 + b"\0"
    assert read_range(placed, big, BIG - 101, 101) == b"\0" + b"b" * 100
    assert placed.stat().st_blocks * 512 < 1 << 20  # the holes stay holes


def test_a_placed_body_must_fit_its_entry(tmp_path: Path) -> None:
    with open(tmp_path / "x.img", "wb+") as out:
        writer = ErofsWriter(out, SEED)
        placed = writer.place(Entry(b"f", Kind.FILE, size=3), io.BytesIO(b"abc"))
        writer.add(Entry(b"", Kind.DIR))
        with pytest.raises(ErofsInputError, match="placed for another size"):
            writer.add(Entry(b"f", Kind.FILE, size=3, xattrs=((b"user.x", b"1"),)), placed=placed)
    with open(tmp_path / "y.img", "wb+") as out:
        writer = ErofsWriter(out, SEED)
        with pytest.raises(ErofsInputError, match="only a regular file"):
            writer.place(Entry(b"d", Kind.DIR), io.BytesIO(b""))
        with pytest.raises(ErofsInputError, match="finished or failed"):
            writer.add(Entry(b"", Kind.DIR))
