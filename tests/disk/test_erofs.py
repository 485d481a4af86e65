"""The EROFS writer's edge cases, each checked by fsck.erofs, our reader and the kernel."""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from support.erofs_check import IS_ROOT, SEED, Item, check_image, fsck, mounted, write
from support.erofs_reader import read_image, read_range

from hypeman_images.disk.erofs import Entry, ErofsResult, ErofsWriter, Kind
from hypeman_images.oci.digest import Digest

ROOT = Entry(b"", Kind.DIR, mode=0o755, mtime=1_700_000_000)
T = 1_700_000_000
CAP = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_bind_service
# system.posix_acl_access for u::rw-, u:1000:r--, g::r--, m::r--, o::--- (version 2).
ACL = bytes.fromhex(
    "02000000" + "01000600ffffffff" + "02000400e8030000" + "04000400ffffffff"
    "10000400ffffffff" + "20000000ffffffff"
)


def file(path: bytes, content: bytes, **kw: object) -> Item:
    return Entry(path, Kind.FILE, size=len(content), mtime=T, **kw), content  # type: ignore[arg-type]


def node(path: bytes, kind: Kind, **kw: object) -> Item:
    return Entry(path, kind, mtime=T, **kw), None  # type: ignore[arg-type]


def test_only_the_root(tmp_path: Path) -> None:
    img = tmp_path / "root.img"
    result = write([(ROOT, None)], img)
    read = check_image(img, [(ROOT, None)])
    assert result.inodes == read.inos == 1
    assert result.size == img.stat().st_size == result.blocks * 4096
    assert read.tree[b"/"].nlink == 2 and read.root_nid > 0


@pytest.mark.parametrize(
    ("size", "layout", "data_blocks"),
    [
        (0, 0, 0),  # empty: flat, no block
        (1, 2, 0),  # all tail, inline
        (4000, 2, 0),  # still fits after a 64-byte inode
        (4095, 0, 1),  # 32 + 4095 > 4096: a block of its own
        (4096, 0, 1),  # exactly a block: no tail
        (4097, 2, 1),  # one block and a 1-byte inline tail
        (3 * 4096 + 4095, 0, 4),
        (1 << 20, 0, 256),
    ],
    ids=["empty", "1B", "4000B", "4095B", "4096B", "4097B", "16383B", "1MiB"],
)
def test_regular_file_sizes(tmp_path: Path, size: int, layout: int, data_blocks: int) -> None:
    content = os.urandom(size)
    items = [(ROOT, None), file(b"f", content)]
    img = tmp_path / "f.img"
    write(items, img)
    read = check_image(img, items)
    assert (read.tree[b"/f"].layout, read.tree[b"/f"].data_blocks) == (layout, data_blocks)


def test_tails_leave_memory_past_the_budget(tmp_path: Path) -> None:
    items = [(ROOT, None), *(file(b"f%d" % i, os.urandom(100 + i)) for i in range(10))]
    img = tmp_path / "budget.img"
    write(items, img, inline_budget=500)
    read = check_image(img, items)
    layouts = [read.tree[b"/f%d" % i].layout for i in range(10)]
    assert layouts == [2] * 4 + [0] * 6  # 100+101+102+103 fit 500 bytes


def test_a_directory_spanning_many_blocks(tmp_path: Path) -> None:
    names = [b"entry-%05d-%s" % (i, b"x" * (i % 40)) for i in range(3000)]
    items = [(ROOT, None), node(b"big", Kind.DIR, mode=0o755)]
    items += [file(b"big/" + n, n) for n in reversed(names)]
    img = tmp_path / "dir.img"
    write(items, img)
    read = check_image(img, items)
    assert read.tree[b"/big"].size > 20 * 4096


def test_names_sort_bytewise_around_dot(tmp_path: Path) -> None:
    names = [b"!", b"-", b".a", b"..b", b"A", b"a", b"\x7f", b"\x80", b"\xff" * 3, b"\x01"]
    items = [(ROOT, None), *(file(n, n) for n in names)]
    img = tmp_path / "sort.img"
    write(items, img)
    check_image(img, items)


def test_a_255_byte_name_not_utf8(tmp_path: Path) -> None:
    name = (b"\xff\xfe" + bytes(range(0x80, 0xFF))) * 2
    name = name[:255]
    assert len(name) == 255
    items = [(ROOT, None), node(name, Kind.DIR, mode=0o700), file(name + b"/" + name, b"hi")]
    img = tmp_path / "name.img"
    write(items, img)
    check_image(img, items)


def test_uid_70000_and_big_ids_take_extended_inodes(tmp_path: Path) -> None:
    items = [
        (ROOT, None),
        file(b"small-ids", b"a", uid=65535, gid=65535),
        file(b"uid", b"b", uid=70000),
        file(b"gid", b"c", gid=4_000_000_000),
    ]
    img = tmp_path / "ids.img"
    write(items, img)
    tree = check_image(img, items).tree
    extended = {p: tree[p].extended for p in (b"/small-ids", b"/uid", b"/gid")}
    assert extended == {b"/small-ids": False, b"/uid": True, b"/gid": True}


def test_mtimes_are_kept_exactly(tmp_path: Path) -> None:
    items = [
        (ROOT, None),
        file(b"common1", b"1"),
        file(b"common2", b"2"),
        (Entry(b"old", Kind.FILE, size=1, mtime=-86400), b"3"),
        (Entry(b"ns", Kind.FILE, size=1, mtime=T, mtime_nsec=123_456_789), b"4"),
        (Entry(b"far", Kind.FILE, size=1, mtime=1 << 40), b"5"),
    ]
    img = tmp_path / "mtime.img"
    write(items, img)
    read = check_image(img, items)
    assert (read.build_time, read.build_time_nsec) == (T, 0)  # the most common mtime
    assert [read.tree[b"/" + n].extended for n in (b"common1", b"old", b"ns", b"far")] == [
        False,
        True,
        True,
        True,
    ]


def test_a_5gib_sparse_file_is_fast_and_small(tmp_path: Path) -> None:
    size = 5 << 30
    head, middle, end = b"head" * 1000, os.urandom(10000), b"end"
    sparse = ((0, len(head)), (3 << 30, len(middle)), (size - 3, 3), (size, 0))
    content_of = {0: head, 3 << 30: middle, size - 3: end}
    entry = Entry(b"sparse", Kind.FILE, size=size, mtime=T, sparse=sparse)
    img = tmp_path / "sparse.img"
    with open(img, "wb+") as out:
        from hypeman_images.disk.erofs import ErofsWriter

        writer = ErofsWriter(out, SEED)
        writer.add(ROOT)
        writer.add(entry, iter([head, middle, end]))
        writer.finish()
    assert img.stat().st_size < 2 << 20 and os.stat(img).st_blocks * 512 < 2 << 20
    fsck(img)
    read = read_image(img, hash_limit=0)
    node_ = read.tree[b"/sparse"]
    assert (node_.size, node_.layout, node_.extended) == (size, 4, True)
    for offset, data in content_of.items():
        assert read_range(img, node_, offset, len(data)) == data
        assert read_range(img, node_, offset + len(data), 4096) == bytes(
            min(4096, size - offset - len(data))
        )
    if IS_ROOT:
        with mounted(img) as mnt, open(mnt / "sparse", "rb") as f:
            assert os.fstat(f.fileno()).st_size == size
            for offset, data in content_of.items():
                f.seek(offset)
                assert f.read(len(data) + 100) == data + bytes(min(100, size - offset - len(data)))


def test_a_sparse_file_that_is_all_hole_or_all_data(tmp_path: Path) -> None:
    hole = Entry(b"hole", Kind.FILE, size=1 << 24, mtime=T, sparse=())
    dense = Entry(b"dense", Kind.FILE, size=9000, mtime=T, sparse=((0, 9000),))
    parts = Entry(b"parts", Kind.FILE, size=20000, mtime=T, sparse=((0, 10), (4096, 5000)))
    content = bytearray(20000)
    content[:10], content[4096:9096] = b"x" * 10, os.urandom(5000)
    items = [(ROOT, None), (hole, bytes(1 << 24)), (dense, os.urandom(9000)), (parts, content)]
    img = tmp_path / "sparse.img"
    write(items, img)
    tree = check_image(img, items).tree
    assert (tree[b"/hole"].layout, tree[b"/hole"].data_blocks) == (4, 0)
    assert tree[b"/dense"].layout == 2  # no holes: stored like any file


def test_shared_xattrs(tmp_path: Path) -> None:
    cap = ((b"security.capability", CAP),)
    items = [(ROOT, None)]
    items += [file(b"bin%02d" % i, b"#!%d" % i, xattrs=cap) for i in range(40)]
    items += [file(b"lonely", b"x", xattrs=((b"user.only", b"one"),))]
    img = tmp_path / "xattr.img"
    write(items, img)
    tree = check_image(img, items).tree
    assert tree[b"/bin00"].xattr_size == 12 + 4  # header and one shared id
    assert tree[b"/lonely"].xattr_size == 12 + 12  # header and the entry inline


def test_xattr_name_indexes(tmp_path: Path) -> None:
    xattrs = (
        (b"user.mime", b"text/plain"),
        (b"trusted.t", b"\0\1\2"),
        (b"security.ima", b"\x03" * 300),
        (b"system.posix_acl_access", ACL),
        (b"user.empty", b""),
        (b"user." + b"n" * 250, b"long name"),  # XATTR_NAME_MAX: 255 bytes in all
    )
    items = [
        (ROOT, None),
        node(b"d", Kind.DIR, mode=0o755, xattrs=((b"system.posix_acl_default", ACL),)),
        file(b"d/f", b"data", xattrs=xattrs),
        node(b"d/l", Kind.SYMLINK, mode=0o777, target=b"f", xattrs=((b"trusted.x", b"1"),)),
    ]
    img = tmp_path / "names.img"
    write(items, img)
    check_image(img, items)


def test_hard_links(tmp_path: Path) -> None:
    items = [
        (ROOT, None),
        file(b"a", b"shared body"),
        node(b"d", Kind.DIR, mode=0o755),
        node(b"d/b", Kind.HARDLINK, target=b"a"),
        node(b"d/c", Kind.HARDLINK, target=b"d/b"),
        node(b"fifo", Kind.FIFO),
        node(b"fifo2", Kind.HARDLINK, target=b"fifo"),
        node(b"s", Kind.SYMLINK, target=b"a"),
        node(b"s2", Kind.HARDLINK, target=b"s"),
    ]
    img = tmp_path / "links.img"
    write(items, img)
    tree = check_image(img, items).tree
    assert tree[b"/a"].nid == tree[b"/d/c"].nid and tree[b"/a"].nlink == 3


def test_devices_fifos_sockets(tmp_path: Path) -> None:
    items = [
        (ROOT, None),
        node(b"null", Kind.CHAR, mode=0o666, devmajor=1, devminor=3),
        node(b"big", Kind.BLOCK, mode=0o660, devmajor=4095, devminor=(1 << 20) - 1),
        node(b"zero", Kind.BLOCK, devmajor=0, devminor=0),
        node(b"fifo", Kind.FIFO, mode=0o600),
        node(b"sock", Kind.SOCKET, mode=0o755),
    ]
    img = tmp_path / "dev.img"
    write(items, img)
    check_image(img, items)


@pytest.mark.parametrize("length", [1, 59, 60, 1000, 4000, 4030, 4095])
def test_symlink_targets(tmp_path: Path, length: int) -> None:
    target = (b"../some/where/" * 300)[:length]
    items = [(ROOT, None), node(b"link", Kind.SYMLINK, mode=0o777, target=target)]
    img = tmp_path / "link.img"
    write(items, img)
    tree = check_image(img, items).tree
    assert tree[b"/link"].layout == (2 if length <= 4096 - 32 else 0)


def test_same_input_same_bytes_other_seed_other_uuid(tmp_path: Path) -> None:
    items = [
        (ROOT, None),
        node(b"d", Kind.DIR, mode=0o755, xattrs=((b"user.a", b"1"),)),
        file(b"d/f", os.urandom(9999), xattrs=((b"user.a", b"1"),)),
        node(b"d/l", Kind.SYMLINK, target=b"f"),
        (Entry(b"s", Kind.FILE, size=1 << 24, mtime=5, sparse=((1 << 23, 3),)), bytes(1 << 24)),
    ]
    a, b, c = tmp_path / "a.img", tmp_path / "b.img", tmp_path / "c.img"
    ra, rb = write(items, a), write(items, b)
    rc = write(items, c, seed=Digest.of(b"another image"))
    fsck(a)
    fsck(c)
    assert a.read_bytes() == b.read_bytes() and ra == rb
    assert rc.uuid != ra.uuid
    assert read_image(c, hash_limit=0).uuid == rc.uuid.bytes
    diff = [
        i for i, (x, y) in enumerate(zip(a.read_bytes(), c.read_bytes(), strict=True)) if x != y
    ]
    assert all(1024 + 4 <= i < 1024 + 8 or 1024 + 48 <= i < 1024 + 64 for i in diff)


def test_dump_erofs_reads_what_we_wrote(tmp_path: Path) -> None:
    items = [
        (ROOT, None),
        file(b"f", b"x" * 5000, uid=70000, xattrs=((b"user.k", b"v"),)),
        file(b"g", b"y", xattrs=((b"user.k", b"v"),)),
        (Entry(b"s", Kind.FILE, size=1 << 30, mtime=T, sparse=((0, 1),)), b"z"),
    ]
    img = tmp_path / "dump.img"
    result = write(items, img)
    fsck(img)
    summary = subprocess.run(["dump.erofs", "-s", str(img)], capture_output=True, text=True)
    assert summary.returncode == 0, summary.stderr
    assert f"Filesystem UUID:{'':30s}{result.uuid}" in summary.stdout
    assert "sb_csum mtime chunked_file" in summary.stdout
    assert "Filesystem inode count:                       4" in summary.stdout
    one = subprocess.run(["dump.erofs", "--path=/f", str(img)], capture_output=True, text=True)
    assert "Size: 5000" in one.stdout and "Inode size: 64" in one.stdout
    assert "Xattr size: 16" in one.stdout  # the header and one shared xattr id


def test_children_in_any_order_make_the_same_tree(tmp_path: Path) -> None:
    kids = [file(b"d/%d" % i, b"%d" % i * i) for i in range(50)]
    kids += [node(b"d/sub%d" % i, Kind.DIR, mode=0o755) for i in range(5)]
    base = [(ROOT, None), node(b"d", Kind.DIR, mode=0o755)]
    one, two = base + kids, base + kids[::-1]
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    write(one, a)
    write(two, b)
    check_image(a, one)
    check_image(b, two)


def test_xattrs_larger_than_a_block(tmp_path: Path) -> None:
    big = tuple((b"user.%d" % i, bytes([i]) * 3000) for i in range(3))
    big_trusted = tuple((b"trusted.%d" % i, bytes([i]) * 3000) for i in range(3))
    shared = ((b"user.shared", b"s" * 4000), (b"trusted.also", b"t" * 2500))
    items = [
        (ROOT, None),
        node(b"d", Kind.DIR, mode=0o755, xattrs=big),
        file(b"d/f", b"tail" * 100, xattrs=big + shared),
        file(b"d/g", b"x", xattrs=shared),
        node(b"d/l", Kind.SYMLINK, target=b"f" * 100, xattrs=big_trusted),
        # user.* is unreadable on a device (fs/xattr.c, xattr_permission): trusted.* only
        node(b"d/c", Kind.CHAR, devmajor=5, devminor=1, xattrs=shared[1:]),
    ]
    img = tmp_path / "bigx.img"
    write(items, img)
    tree = check_image(img, items).tree
    assert tree[b"/d/l"].layout == 0 and tree[b"/d/f"].layout == 0  # no room to inline
    # A tail is kept for inlining only if it fits beside all its xattrs inline: sharing
    # is decided at the end, after the body has gone by.
    assert tree[b"/d/g"].layout == 0 and tree[b"/d/g"].xattr_size == 12 + 8


def test_a_reused_output_file_is_rewritten_whole(tmp_path: Path) -> None:
    img = tmp_path / "reused.img"
    img.write_bytes(b"\xff" * (8 << 20))
    size = 5 << 30  # big enough that zeros inside a chunk are skipped by seeking
    sparse = Entry(b"s", Kind.FILE, size=size, mtime=T, sparse=((0, 1), (3 << 30, 1)))
    with open(img, "r+b") as out:
        from hypeman_images.disk.erofs import ErofsWriter

        writer = ErofsWriter(out, SEED)
        writer.add(ROOT)
        writer.add(sparse, iter([b"a", b"z"]))
        result = writer.finish()
    assert img.stat().st_size == result.size
    fsck(img)
    read = read_image(img, hash_limit=0)
    s = read.tree[b"/s"]
    assert read_range(img, s, 0, 1 << 20) == b"a" + bytes((1 << 20) - 1)
    assert read_range(img, s, 3 << 30, 1 << 20) == b"z" + bytes((1 << 20) - 1)


def _write_with_head(img: Path, on_head: Callable[[int], None] | None) -> ErofsResult:
    """Many directories (metadata over several blocks) and, placed last, a chunked file
    whose last chunk ends in zeros: the data area ends in a hole."""
    size = 5 << 30
    middle = random.Random(1).randbytes(10_000)
    sparse = Entry(
        b"z/sparse", Kind.FILE, size=size, mtime=T, sparse=((0, 4), (3 << 30, 10_000), (size, 0))
    )
    with open(img, "wb+") as out:
        writer = ErofsWriter(out, SEED)
        writer.add(ROOT)
        writer.add(Entry(b"big", Kind.DIR, mode=0o755, mtime=T))
        for i in range(1500):
            data = random.Random(i).randbytes(i * 7 % 9000)
            writer.add(Entry(b"big/entry-%04d" % i, Kind.FILE, size=len(data), mtime=T), [data])
        for i in range(300):
            writer.add(Entry(b"d%03d" % i, Kind.DIR, mode=0o700, mtime=T + i))
        writer.add(Entry(b"z", Kind.DIR, mode=0o755, mtime=T))
        writer.add(sparse, iter([b"head", middle]))
        return writer.finish(on_head=on_head)


def test_the_head_is_final_before_the_metadata_is_written(tmp_path: Path) -> None:
    """``finish(on_head=)``: block 0 and the data area are in the file, whole and final,
    before anything after them is written; the build hashes them meanwhile (disk/filehash.py)."""
    img = tmp_path / "head.img"
    seen: list[tuple[int, int, bytes]] = []

    def on_head(n: int) -> None:
        with open(img, "rb") as f:  # another reader, as the hashing thread is
            seen.append((n, os.fstat(f.fileno()).st_size, f.read(n)))

    result = _write_with_head(img, on_head)
    [(n, size_then, head)] = seen
    image = img.read_bytes()
    assert size_then == n and n % 4096 == 0  # nothing past the head yet; its hole has a length
    assert head == image[:n] and head[1024:1028] == (0xE0F5E1E2).to_bytes(4, "little")
    assert result.size == len(image) and result.blocks - n // 4096 >= 8  # the metadata after
    fsck(img)
    _write_with_head(tmp_path / "plain.img", None)
    assert (tmp_path / "plain.img").read_bytes() == image
