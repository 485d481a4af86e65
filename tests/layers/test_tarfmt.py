"""Tar headers: our reader against our writer, GNU tar and Python's tarfile."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import sparse
from support.tar import build_tar, file, hardlink, symlink

from hypeman_images.errors import LayerError, LimitExceeded
from hypeman_images.layers import tarheader, tarread, tarwrite
from hypeman_images.layers.tar import BLOCK, CHAR, HARDLINK, REGULAR, SYMLINK


def read_all(data: bytes, **kw: int) -> list[tuple[tarheader.Header, bytes]]:
    reader = tarread.TarReader(
        io.BytesIO(data),
        where="test",
        max_bytes=kw.get("max_bytes", 1 << 40),
        max_header_bytes=kw.get("max_header_bytes", 1 << 20),
    )
    out = []
    for header in reader:
        body = io.BytesIO()
        reader.copy_body(body)
        out.append((header, body.getvalue()))
    return out


def one(data: bytes) -> tarheader.Header:
    (header, _), *_ = read_all(data)
    return header


@pytest.mark.parametrize(
    "pax_record",
    [b"%d path=x\n", b"%d mtime=1.5\n"],
    ids=["path", "fraction"],
)
def test_pax_record_length_counts_itself(pax_record: bytes) -> None:
    key, _, value = pax_record[3:-1].partition(b"=")
    record = tarwrite.pax_record(key, value)
    assert int(record.split(b" ")[0]) == len(record)


@pytest.mark.parametrize("n", [1, 5, 6, 7, 90, 91, 92, 93, 994, 995, 996, 9990])
def test_pax_record_lengths_at_digit_boundaries(n: int) -> None:
    record = tarwrite.pax_record(b"k", b"v" * n)
    assert int(record.split(b" ")[0]) == len(record)


names = st.binary(min_size=1, max_size=400).map(
    lambda b: b.replace(b"\0", b"n").replace(b"/", b"s")
) | st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=12).map(
    lambda parts: b"/".join(p.replace(b"\0", b"n").replace(b"/", b"s") for p in parts)
)


@settings(max_examples=200, deadline=None)
@given(
    name=names,
    link=st.binary(max_size=300).map(lambda b: b.replace(b"\0", b"z")),
    uid=st.integers(0, (1 << 32) - 1),
    gid=st.integers(0, (1 << 32) - 1),
    mtime=st.integers(-(1 << 40), 1 << 40),
    mode=st.integers(0, 0o7777),
    xattrs=st.dictionaries(
        st.sampled_from(["user.a", "security.capability"]), st.binary(max_size=64)
    ).map(lambda d: list(d.items())),
)
def test_writer_reader_round_trip(
    name: bytes,
    link: bytes,
    uid: int,
    gid: int,
    mtime: int,
    mode: int,
    xattrs: list[tuple[str, bytes]],
) -> None:
    data = (
        tarwrite.encode_header(
            name,
            SYMLINK,
            mode=mode,
            uid=uid,
            gid=gid,
            mtime=mtime,
            linkname=link,
            xattrs=tuple(xattrs),
        )
        + tarwrite.END_OF_ARCHIVE
    )
    h = one(data)
    assert (h.name, h.linkname, h.uid, h.gid, h.mtime, h.mode) == (
        name,
        link,
        uid,
        gid,
        mtime,
        mode,
    )
    assert list(h.xattrs) == xattrs


def test_python_tarfile_reads_our_output() -> None:
    data = (
        tarwrite.encode_header(b"d/" * 100 + b"f", REGULAR, size=3, uid=1 << 22, mtime=5)
        + b"abc"
        + tarwrite.padding(3)
        + tarwrite.END_OF_ARCHIVE
    )
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        (member,) = tar.getmembers()
        assert (member.name, member.uid, member.size) == ("d/" * 100 + "f", 1 << 22, 3)


def test_large_size_goes_to_pax() -> None:
    header = tarwrite.encode_header(b"big", REGULAR, size=10 << 30)
    assert b"size=10737418240" in header
    reader = tarread.TarReader(
        io.BytesIO(header), where="t", max_bytes=1 << 40, max_header_bytes=1 << 20
    )
    assert next(iter(reader)).size == 10 << 30  # the body is never read


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
def test_reads_gnu_tar_long_names_and_base256(tmp_path: Path) -> None:
    deep = tmp_path / "src" / ("x" * 120) / ("y" * 120)
    deep.mkdir(parents=True)
    (deep / "f").write_bytes(b"hello")
    (tmp_path / "src" / "l").symlink_to("t" * 150)
    out = subprocess.run(
        [
            "tar",
            "--format=gnu",
            "--owner=3000000",
            "--group=0",
            "-C",
            str(tmp_path / "src"),
            "-cf",
            "-",
            ".",
        ],
        capture_output=True,
        check=True,
    ).stdout
    entries = {h.name.rstrip(b"/"): (h, body) for h, body in read_all(out)}
    h, body = entries[b"./" + b"x" * 120 + b"/" + b"y" * 120 + b"/f"]
    assert (body, h.uid) == (b"hello", 3000000)
    assert entries[b"./l"][0].linkname == b"t" * 150


def test_ustar_prefix_is_joined() -> None:
    name = b"p" * 120 + b"/" + b"n" * 90
    header = tarwrite.encode_header(name, REGULAR)
    assert len(header) == 512  # fits the split, no PAX header
    assert one(header).name == name


def test_non_utf8_long_name_announces_binary_charset() -> None:
    name = b"\xff" * 150
    header = tarwrite.encode_header(name, REGULAR)
    assert b"hdrcharset=BINARY" in header
    assert one(header).name == name


def test_corrupt_checksum_is_a_layer_error() -> None:
    data = bytearray(build_tar([file("a", b"x")]))
    data[0] ^= 1
    with pytest.raises(LayerError, match="checksum"):
        read_all(bytes(data))


def test_truncated_body_is_a_layer_error() -> None:
    data = build_tar([file("a", b"x" * 2000)])[:1024]
    with pytest.raises(LayerError, match="truncated"):
        read_all(data)


def test_header_only_types_ignore_size_field() -> None:
    # Some writers put the target's size in a hard link header; no body follows.
    data = bytearray(tarwrite.encode_header(b"l", HARDLINK, linkname=b"a"))
    data[124:136] = b"%011o\0" % 1000
    data[148:156] = b"        "
    data[148:156] = b"%06o\0 " % sum(data)
    data += build_tar([file("after", b"ok")])
    got = read_all(bytes(data))
    assert [h.name for h, _ in got] == [b"l", b"after"]


def _with_field(header: bytes, start: int, end: int, value: bytes) -> bytes:
    """``header`` with bytes ``start:end`` replaced and the checksum made right again."""
    data = bytearray(header)
    data[start:end] = value.ljust(end - start, b"\0")
    data[148:156] = b"        "
    data[148:156] = b"%06o\0 " % sum(data)
    return bytes(data)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("uid", b"  1750 \0", 0o1750),  # space-padded, as old writers did
        ("uid", b"\x80\0\0\0\0\0\x10\x00", 4096),  # GNU base-256
        ("mtime", b"17\0garbage", 0o17),  # digits then junk: still a number to GNU tar and Go
    ],
)
def test_numeric_fields_off_the_fast_path(field: str, value: bytes, expected: int) -> None:
    start, end = {"uid": (108, 116), "mtime": (136, 148)}[field]
    header = _with_field(tarwrite.encode_header(b"a", REGULAR), start, end, value)
    assert getattr(one(header + tarwrite.END_OF_ARCHIVE), field) == expected


def test_corrupt_number_in_an_entry_names_its_field() -> None:
    header = _with_field(tarwrite.encode_header(b"a", CHAR), 329, 337, b"nine")
    with pytest.raises(LayerError, match="devmajor field"):
        read_all(header)


def test_pax_header_fields_other_than_size_are_not_read() -> None:
    # The meta header's mode..devminor describe nothing; junk there (seen from some
    # writers) must not stop the entry it belongs to.
    blocks = tarwrite.encode_header(b"x" * 300, REGULAR)  # PAX header, its data, ustar
    assert len(blocks) == 3 * BLOCK
    junk = _with_field(blocks[:512], 329, 337, b"junk") + blocks[512:]
    assert one(junk).name == b"x" * 300


def test_missing_end_marker_is_accepted() -> None:
    data = build_tar([file("a", b"x"), symlink("s", "a"), hardlink("h", "a")])[:-1024]
    assert [h.ordinal for h, _ in read_all(data)] == [0, 1, 2]


def test_giant_gnu_long_name_hits_header_limit() -> None:
    header = tarwrite.encode_header(b"././@LongLink", b"L", size=5 << 20)
    with pytest.raises(LimitExceeded, match="max_header_bytes"):
        read_all(header + b"\0" * (5 << 20))


def test_layer_byte_limit() -> None:
    with pytest.raises(LimitExceeded, match="max_layer_bytes"):
        read_all(build_tar([file("a", b"x" * 10000)]), max_bytes=4096)


# -- sparse files (GNU tar --sparse) ----------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(sparse.FORMATS))
def test_gnu_tar_sparse_files_read_as_the_original(fmt: str) -> None:
    """Each format GNU tar writes: a regular file of the real size, holes as zeros,
    in one pass (copy_body) and in a second one that seeks to the body (copy_at)."""
    data = sparse.member("dir/sparse", fmt) + tarwrite.END_OF_ARCHIVE
    ((header, body),) = read_all(data)
    assert (header.name, header.typeflag, header.size) == (b"dir/sparse", b"0", sparse.SIZE)
    assert (header.mode, header.mtime) == (0o640, 1000)
    assert body == sparse.content()
    again = io.BytesIO()
    reader = tarread.TarReader(
        io.BytesIO(data), where="test", max_bytes=1 << 40, max_header_bytes=1 << 20
    )
    reader.copy_at(header.offset, header.size, again, header.sparse)
    assert again.getvalue() == body


def test_gnu_tar_extracts_what_we_read(tmp_path: Path) -> None:
    """The reference reader agrees: GNU tar itself gives back the same bytes."""
    (tmp_path / "x.tar").write_bytes(sparse.member("s", "pax-1.0") + tarwrite.END_OF_ARCHIVE)
    subprocess.run(["tar", "-xf", "x.tar"], cwd=tmp_path, check=True)
    assert (tmp_path / "s").read_bytes() == one_body(tmp_path / "x.tar") == sparse.content()


def one_body(path: Path) -> bytes:
    ((_, body),) = read_all(path.read_bytes())
    return body


class _Counter(io.RawIOBase):
    """A sink that keeps only how many bytes, and the largest write, it was given."""

    def __init__(self) -> None:
        self.total = self.largest = 0
        self.nonzero = False

    def write(self, data: bytes) -> int:  # type: ignore[override]
        n = len(data)
        self.total += n
        self.largest = max(self.largest, n)
        self.nonzero = self.nonzero or any(bytes(data[:16]))
        return n


def pax_sparse(name: str, stored: bytes, fragments: str, real: int, **extra: bytes) -> bytes:
    """A PAX 0.1 sparse member written by hand: ``fragments`` is GNU.sparse.map."""
    count = len(fragments.split(",")) // 2 if fragments else 0
    pax = {
        "GNU.sparse.major": b"0",
        "GNU.sparse.minor": b"1",
        "GNU.sparse.name": name.encode(),
        "GNU.sparse.size": b"%d" % real,
        "GNU.sparse.numblocks": b"%d" % count,
        "GNU.sparse.map": fragments.encode(),
        **extra,
    }
    return build_tar([file("GNUSparseFile.0/" + name, stored, pax=pax)])


def pax_sparse_1_0(name: str, map_text: bytes, stored: bytes, real: int) -> bytes:
    """A PAX 1.0 sparse member: the map is the data's first block(s)."""
    pax = {
        "GNU.sparse.major": b"1",
        "GNU.sparse.minor": b"0",
        "GNU.sparse.name": name.encode(),
        "GNU.sparse.realsize": b"%d" % real,
    }
    padded = map_text + b"\0" * (-len(map_text) % 512)
    return build_tar([file("GNUSparseFile.0/" + name, padded + stored, pax=pax)])


def gnu_sparse(fragments: list[tuple[int, int]], stored: bytes, real: int, ext: int = 0) -> bytes:
    """An old GNU 'S' member: up to 4 fragments in the header, then ``ext`` extension
    blocks that each say another follows (the last one too: a map with no end)."""
    block = bytearray(512)
    block[0:6] = b"sparse"
    block[100:108], block[108:116], block[116:124] = b"0000644\0", b"0000000\0", b"0000000\0"
    block[124:136] = b"%011o\0" % len(stored)
    block[136:148] = b"%011o\0" % 1000
    block[156:157] = b"S"
    block[257:265] = b"ustar  \0"
    for i, (offset, length) in enumerate(fragments):
        at = 386 + 24 * i
        block[at : at + 24] = b"%011o\0%011o\0" % (offset, length)
    block[482] = 1 if ext else 0
    block[483:495] = b"%011o\0" % real
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    extension = bytearray(512)
    extension[504] = 1
    body = stored + b"\0" * (-len(stored) % 512)
    return bytes(block) + bytes(extension) * ext + body + tarwrite.END_OF_ARCHIVE


def test_a_sparse_file_of_many_gib_is_streamed_not_buffered() -> None:
    """The >= 8 GiB path on a synthetic stream: 10 GiB of holes around 4 KiB of data
    come out in chunks of at most 1 MiB, never as one buffer."""
    real = 10 << 30
    data = pax_sparse("big", b"d" * 4096, f"{real - 4096},4096", real)
    reader = tarread.TarReader(
        io.BytesIO(data), where="test", max_bytes=1 << 40, max_header_bytes=1 << 20
    )
    (header,) = list(_bodies(reader, sink := _Counter()))
    assert header.size == real
    assert sink.total == real and sink.largest <= 1 << 20
    encoded = tarwrite.encode_header(b"big", REGULAR, size=real)
    assert b"size=10737418240" in encoded  # the merged stream carries it in PAX


def _bodies(reader: tarread.TarReader, sink: io.RawIOBase) -> list[tarheader.Header]:
    out = []
    for header in reader:
        reader.copy_body(sink)  # type: ignore[arg-type]
        out.append(header)
    return out


def test_the_holes_count_against_the_layer_limit() -> None:
    """A few bytes of layer cannot make a huge file: the holes count as uncompressed bytes."""
    data = pax_sparse("bomb", b"x", "0,1", 1 << 40)
    with pytest.raises(
        LimitExceeded, match=r"test, entry 0 .*holes of sparse files.*max_layer_bytes"
    ):
        read_all(data, max_bytes=1 << 30)


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (pax_sparse("s", b"ab", "10,1,5,1", 100), "overlaps or precedes"),
        (pax_sparse("s", b"ab", "0,2,1,0", 100), "overlaps or precedes"),
        (pax_sparse("s", b"ab", "0,1,99,1", 99), "runs past the real size 99"),
        (pax_sparse("s", b"abc", "0,1,5,1", 100), "describes 2 bytes of data but .* stores 3"),
        (pax_sparse("s", b"ab", "0,1,5", 100), "corrupt sparse map"),
        (pax_sparse("s", b"ab", "0,1,x,1", 100), "not a number"),
        (pax_sparse("s", b"", "", 100, **{"GNU.sparse.numblocks": b"3"}), "0 numbers for 3"),
        (pax_sparse("s", b"", "", 5, **{"GNU.sparse.minor": b"7"}), "format b'0'.b'7'"),
        (pax_sparse_1_0("s", b"2\n0\n1\n", b"a", 10), "runs past the entry's data"),
        (pax_sparse_1_0("s", b"1\n0\n-1\n", b"a", 10), "not a number"),
        (gnu_sparse([(0, 4), (2, 4)], b"abcdefgh", 100), "overlaps or precedes"),
        (gnu_sparse([(0, 4), (98, 4)], b"abcdefgh", 100), "runs past the real size"),
    ],
    ids=[
        "backwards", "overlap", "past-real-size", "data-mismatch", "odd-map", "not-number",
        "count-mismatch", "unknown-version", "1.0-map-past-data", "1.0-negative", "gnu-overlap",
        "gnu-past-real-size",
    ],
)  # fmt: skip
def test_hostile_sparse_maps_are_refused_naming_layer_and_entry(data: bytes, says: str) -> None:
    with pytest.raises(LayerError, match=says) as info:
        read_all(data)
    assert "test, entry 0" in str(info.value)
    if "format" not in says:
        assert "'s'" in str(info.value) or "sparse" in str(info.value)


@pytest.mark.parametrize(
    "data",
    [
        pax_sparse_1_0("s", b"99999999999999\n" + b"0\n" * 400, b"z" * 4096, 10),
        gnu_sparse([(0, 1)], b"a", 10, ext=3),
    ],
    ids=["1.0", "gnu-extension-chain"],
)
def test_absurdly_long_sparse_maps_hit_the_header_limit(data: bytes) -> None:
    with pytest.raises(LimitExceeded, match=r"test, entry 0 .*sparse map.*max_header_bytes"):
        read_all(data, max_header_bytes=1024)
