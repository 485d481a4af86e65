"""Random trees written by the EROFS writer read back the same through our reader."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.erofs_check import Item, expected, fsck, write
from support.erofs_reader import listing, read_image

from hypeman_images.disk.erofs import Entry, Kind

NAMES = st.binary(min_size=1, max_size=12).filter(
    lambda n: b"/" not in n and b"\0" not in n and n not in (b".", b"..")
)
XATTRS = st.lists(
    st.sampled_from(
        [
            (b"user.a", b"1"),
            (b"user.b", b"x" * 40),
            (b"security.capability", bytes.fromhex("0100000200200000000000000000000000000000")),
            (b"trusted.t", b""),
        ]
    ),
    max_size=3,
    unique_by=lambda x: x[0],
).map(tuple)
META = st.fixed_dictionaries(
    {
        "mode": st.integers(0, 0o7777),
        "uid": st.sampled_from([0, 1000, 65535, 70000]),
        "gid": st.sampled_from([0, 100, 1 << 31]),
        "mtime": st.sampled_from([0, 1_700_000_000, -5, 1 << 33]),
        "mtime_nsec": st.sampled_from([0, 0, 999_999_999]),
        "xattrs": XATTRS,
    }
)


@st.composite
def trees(draw: st.DrawFn) -> list[Item]:
    items: list[Item] = [(Entry(b"", Kind.DIR, **draw(META)), None)]
    dirs, others = [b""], []
    for _ in range(draw(st.integers(0, 40))):
        parent = draw(st.sampled_from(dirs))
        path = (parent + b"/" if parent else b"") + draw(NAMES)
        if any(e.path == path for e, _ in items):
            continue
        kind = draw(st.sampled_from(list(Kind)))
        meta = draw(META)
        if kind is Kind.DIR:
            dirs.append(path)
            items.append((Entry(path, kind, **meta), None))
        elif kind is Kind.FILE:
            items.append(draw(_file(path, meta)))
            others.append(path)
        elif kind is Kind.HARDLINK and others:
            items.append((Entry(path, kind, target=draw(st.sampled_from(others))), None))
            others.append(path)
        elif kind is Kind.SYMLINK:
            target = draw(st.binary(min_size=1, max_size=300).filter(lambda t: b"\0" not in t))
            items.append((Entry(path, kind, target=target, **meta), None))
        elif kind is not Kind.HARDLINK:
            dev = {"devmajor": draw(st.integers(0, 4095)), "devminor": draw(st.integers(0, 9999))}
            items.append((Entry(path, kind, **dev, **meta), None))
            others.append(path)
    return items


@st.composite
def _file(draw: st.DrawFn, path: bytes, meta: dict[str, object]) -> Item:
    size = draw(st.sampled_from([0, 1, 100, 4095, 4096, 4097, 9000]))
    content = bytearray(draw(st.binary(min_size=size, max_size=size)))
    sparse = None
    if size and draw(st.booleans()):
        start = draw(st.integers(0, size - 1))
        length = draw(st.integers(0, size - start))
        sparse = ((start, length),)
        content[:start] = bytes(start)
        content[start + length :] = bytes(size - start - length)
    entry = Entry(path, Kind.FILE, size=size, sparse=sparse, **meta)  # type: ignore[arg-type]
    return entry, bytes(content)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees())
def test_random_trees_read_back(items: list[Item]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "t.img"
        result = write(items, image)
        read = read_image(image)
        assert listing(read.tree) == expected(items)
        assert read.inos == result.inodes
        fsck(image)
