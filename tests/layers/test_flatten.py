"""Layer semantics of the flattener, one golden listing per edge case.

Each case is a hand-written layer stack; the merged tree -- read back from the
tar that :func:`write_tar` emits, so emission is checked too -- is compared
with ``tests/golden/flatten/<case>.txt``. Regenerate after a deliberate change
with ``UPDATE_GOLDEN=1 pytest tests/layers/test_flatten.py`` and review the diff:
goldens are only as right as the person who reads them.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.cases import BASE, CAP, CASES, ERRORS, Layers, d, symlink_chain
from support.oracle import apply_layers
from support.tar import TarEntry, build_tar, file, hardlink, opaque, symlink, whiteout

from hypeman_images.errors import LayerError, LimitExceeded
from hypeman_images.layers.emit import write_tar
from hypeman_images.layers.limits import Limits
from hypeman_images.layers.merge import Merger, merge
from hypeman_images.layers.plan import Tree
from hypeman_images.layers.scan import scan_layer
from hypeman_images.layers.tar import BLOCKDEV, CHAR, HARDLINK, REGULAR, SYMLINK
from hypeman_images.layers.tarread import TarReader
from hypeman_images.layers.tarwrite import END_OF_ARCHIVE, encode_header

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "flatten"


def flatten(layers: Layers | Sequence[bytes], limits: Limits | None = None) -> tuple[Tree, bytes]:
    """Scan, merge and emit uncompressed layer tars; the tree and the output tar."""
    tars = [t if isinstance(t, bytes) else build_tar(list(t)) for t in layers]
    scans = [scan_layer(io.BytesIO(t), i, limits=limits) for i, t in enumerate(tars)]
    tree = merge(scans, limits)
    out = io.BytesIO()
    write_tar(tree, lambda i: io.BytesIO(tars[i]), out, limits)
    return tree, out.getvalue()


def _show(path: bytes) -> str:
    return "/" + repr(path)[2:-1] if path else "/"


def listing(tree: Tree, output: bytes) -> str:
    """A readable listing of the output tar, sorted by path, plus the xattr fixups.

    ``path  type  mode  uid:gid  mtime  size  sha256[:16] | -> target | major,minor  [xattrs]``;
    hard links print ``= primary``. Non-printable bytes are escaped as in Python.
    """
    rows: list[tuple[list[bytes], str]] = []
    reader = TarReader(
        io.BytesIO(output), where="output", max_bytes=1 << 40, max_header_bytes=1 << 20
    )
    for h in reader:
        path = h.name.rstrip(b"/").removeprefix(b".").lstrip(b"/")
        kind = {b"0": "file", b"1": "link", b"2": "symlink", b"3": "char", b"4": "block"}.get(
            h.typeflag, {b"5": "dir", b"6": "fifo"}.get(h.typeflag, "?")
        )
        extra = ""
        if h.typeflag == REGULAR:
            body = io.BytesIO()
            reader.copy_body(body)
            extra = f"{h.size} {hashlib.sha256(body.getvalue()).hexdigest()[:16]}"
        elif h.typeflag == SYMLINK:
            extra = "-> " + repr(h.linkname)[2:-1]
        elif h.typeflag == HARDLINK:
            extra = "= " + _show(h.linkname)
        elif h.typeflag in (CHAR, BLOCKDEV):
            extra = f"{h.devmajor},{h.devminor}"
        xattrs = " ".join(f"{k}={v.hex()}" for k, v in h.xattrs)
        line = f"{_show(path)}  {kind} {h.mode:04o} {h.uid}:{h.gid} t={h.mtime} {extra} {xattrs}"
        rows.append((path.split(b"/"), line.rstrip()))
    lines = [line for _, line in sorted(rows)]
    lines += [f"fixup {_show(f.path[1:])} {f.name}={f.value.hex()}" for f in tree.xattr_fixups]
    s = tree.stats
    lines.append(
        f"stats inodes={s.inodes} dirs={s.directories} files={s.regular_files} "
        f"bytes={s.regular_bytes} blocks={s.regular_blocks} symlinks={s.symlinks} "
        f"long_symlinks={s.long_symlinks} hard_links={s.hard_links} xattr_bytes={s.xattr_bytes}"
    )
    return "\n".join(lines) + "\n"


def check_golden(case: str, text: str) -> None:
    path = GOLDEN / f"{case}.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no golden for {case}; run with UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text(), f"{case} differs from {path}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    tree, output = flatten(CASES[case])
    check_golden(case, listing(tree, output))


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_oracle(case: str) -> None:
    if case in {"hostile_names", "devices_fifos", "whiteouts_stored_as_link_and_chardev"}:
        pytest.skip("the oracle drops escaping paths (we clamp) and keeps unknown types")
    _, output = flatten(CASES[case])
    want = apply_layers([build_tar(list(layer)) for layer in CASES[case]])
    got = apply_layers([output])
    strip = {p: n.__class__(**{**n.__dict__, "xattrs": {}}) for p, n in want.items()}
    got = {p: n.__class__(**{**n.__dict__, "xattrs": {}}) for p, n in got.items()}
    from support.disk import compare_trees

    assert compare_trees(strip, got) == []


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_errors(case: str) -> None:
    layers, exc, text = ERRORS[case]
    with pytest.raises(exc, match=text) as info:
        flatten(layers)
    # Named so a user finds the entry: its layer, its number in the layer, its path.
    message = str(info.value)
    assert re.match(r"layer \d+(?: \([^)]*\))?, entry \d+", message), message
    named = [repr(e.pax.get("path", e.name).strip(b"/"))[:40] for layer in layers for e in layer]
    assert any(name in message for name in named), message


@pytest.mark.parametrize(
    ("limits", "layers", "field"),
    [
        (Limits(max_entries=3), [[file("a"), file("b"), file("c"), file("d")]], "max_entries"),
        (Limits(max_entries=3), [[file("a"), file("b")], [file("c"), file("d")]], "max_entries"),
        (Limits(max_layer_bytes=4096), [[file("a", b"x" * 8192)]], "max_layer_bytes"),
        (Limits(max_image_bytes=2000), [[file("a")], [file("b")]], "max_image_bytes"),
        (Limits(max_header_bytes=600), [[file("p" * 700 + "/x")]], "max_header_bytes"),
        (Limits(max_path_bytes=50), [[file("p/" * 30)]], "max_path_bytes"),
        (Limits(max_link_bytes=10), [[symlink("s", "t" * 20)]], "max_link_bytes"),
    ],
    ids=["entries-layer", "entries-image", "layer-bytes", "image-bytes", "header", "path", "link"],
)
def test_limits(limits: Limits, layers: Layers, field: str) -> None:
    with pytest.raises(LimitExceeded, match=field):
        flatten(layers, limits)


def test_device_numbers_of_other_kinds_never_reach_the_stream() -> None:
    # A file header's devmajor field means nothing, but a base-256 value there
    # written back as octal would overflow its field and corrupt the stream.
    data = bytearray(encode_header(b"f", REGULAR, size=1))
    data[329:337] = b"\x80" + (1 << 40).to_bytes(7, "big")
    data[148:156] = b"        "
    data[148:156] = b"%06o\0 " % sum(data)
    layer = bytes(data) + b"x" + b"\0" * 511 + END_OF_ARCHIVE
    _, output = flatten([layer])
    reader = TarReader(
        io.BytesIO(output), where="output", max_bytes=1 << 40, max_header_bytes=1 << 20
    )
    assert {h.name: h.devmajor for h in reader} == {b"./": 0, b"f": 0}


def test_giant_pax_header_is_refused_by_default() -> None:
    layer = build_tar([file("x", b"", pax={"comment": b"c" * (2 << 20)})])
    with pytest.raises(LimitExceeded, match="max_header_bytes"):
        flatten([layer])


def test_output_is_deterministic() -> None:
    layers = [CASES["xattrs"][0], *CASES["hardlinks_same_layer"], *CASES["odd_names"]]
    assert flatten(layers)[1] == flatten(layers)[1]


def test_layers_without_surviving_files_are_not_reread() -> None:
    tars = [build_tar([file("a", b"gone")]), build_tar([whiteout("a"), d("only-dirs")])]
    scans = [scan_layer(io.BytesIO(t), i) for i, t in enumerate(tars)]
    opened: list[int] = []

    def open_layer(i: int) -> io.BytesIO:
        opened.append(i)
        return io.BytesIO(tars[i])

    write_tar(merge(scans), open_layer, io.BytesIO())
    assert opened == []


def test_diff_id_is_sha256_of_uncompressed_stream() -> None:
    tar = build_tar(BASE) + b"\0" * 5000  # trailing padding counts too
    scan = scan_layer(io.BytesIO(tar), 0, name="sha256:abc")
    assert scan.diff_id.encoded == hashlib.sha256(tar).hexdigest()
    assert scan.size == len(tar)
    from hypeman_images.oci.digest import Digest

    scan.check_diff_id(Digest.of(tar))
    with pytest.raises(LayerError, match=r"layer 0 \(sha256:abc\).*diff_ids"):
        scan.check_diff_id(Digest.of(b"other"))


def test_stats_count_inodes_once_per_link_group() -> None:
    tree, _ = flatten([[file("a", b"x" * 5000), hardlink("b", "a"), d("d"), symlink("s", "a")]])
    s = tree.stats
    assert (s.inodes, s.directories, s.regular_files, s.hard_links) == (4, 2, 1, 1)
    assert (s.regular_bytes, s.regular_blocks) == (5000, 2)
    assert s.directory_blocks() == 2


def test_symlink_hop_limit_is_securejoins() -> None:
    """255 dereferences resolve (securejoin allows them); the 256th is ELOOP (in ERRORS)."""
    tree, _ = flatten(symlink_chain(255))
    assert b"d/f" in tree.nodes()
    assert "/d/f" in apply_layers(build_tar(layer) for layer in symlink_chain(255))


def test_symlinked_parents_never_reach_the_stream() -> None:
    """Every emitted path is a real path: no component of any entry's parent is a symlink."""
    layers = [CASES[c] for c in sorted(CASES) if "symlink" in c]
    for stack in layers:
        tree, _ = flatten(stack)
        nodes = tree.nodes()
        for path in nodes:
            parts = path.split(b"/")
            for i in range(1, len(parts)):
                assert nodes[b"/".join(parts[:i])].entry.kind.value == "dir", path


# -- property: the flattener agrees with the oracle on random stacks ---------------------

_NAMES = ["a", "b", "c"]
_paths = st.lists(st.sampled_from(_NAMES), min_size=1, max_size=3).map("/".join)
# Symlink targets: relative, absolute, climbing with ``..`` (clamped at the root), or
# bare ``.``/``..``, so later entries often go through symlinked parents, chains and loops.
_targets = st.one_of(
    _paths,
    _paths.map(lambda p: "/" + p),
    _paths.map(lambda p: "../" + p),
    st.sampled_from([".", "..", "/", "a/..", "../../b"]),
)


@st.composite
def _entry(draw: st.DrawFn) -> TarEntry:
    path = draw(_paths)
    kind = draw(st.sampled_from(["file", "dir", "symlink", "link", "whiteout", "opaque"]))
    if kind == "file":
        return file(path, draw(st.binary(max_size=3)), mode=draw(st.sampled_from([0o644, 0o755])))
    if kind == "dir":
        return d(path, mode=draw(st.sampled_from([0o755, 0o700])))
    if kind == "symlink":
        return symlink(path, draw(_targets))
    if kind == "link":
        return hardlink(path, draw(_paths))
    if kind == "whiteout":
        return whiteout(path)
    return opaque(path)


_stacks = st.lists(st.lists(_entry(), max_size=6), min_size=1, max_size=4)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_stacks)
def test_property_matches_oracle(stack: list[list[TarEntry]]) -> None:
    tars = [build_tar(layer) for layer in stack]
    try:
        want = apply_layers(tars)
    except ValueError:
        with pytest.raises(LayerError):
            flatten(tars)
        return
    _, output = flatten(tars)
    from support.disk import compare_trees

    assert compare_trees(want, apply_layers([output])) == []


# -- mke2fs reads the stream -------------------------------------------------------------

_needs_mke2fs = pytest.mark.skipif(shutil.which("mke2fs") is None, reason="needs e2fsprogs")


def _mkfs(output: bytes, tmp_path: Path) -> Path:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(
        [
            "mke2fs",
            "-q",
            "-F",
            "-t",
            "ext4",
            "-O",
            "^has_journal",
            "-b",
            "4096",
            "-d",
            "-",
            str(img),
        ],
        input=output,
        check=True,
        capture_output=True,
    )
    return img


@_needs_mke2fs
@pytest.mark.parametrize(
    "case",
    [
        "hardlink_target_replaced_later",
        "opaque_siblings_before_and_after_marker",
        "ids_and_mode_bits",
        "odd_names",
        "symlinks",
        "dir_over_dir_keeps_children",
        "hardlinks_same_layer",
        "deep_path",
        "sparse_files",
        "sparse_gnu_format",
    ],
)
def test_mke2fs_accepts_stream(case: str, tmp_path: Path) -> None:
    from support.disk import compare_trees, e2fsck_clean, read_disk_tree

    if os.geteuid() != 0 and case in {"odd_names", "deep_path"}:
        pytest.skip("the debugfs reader cannot walk these names")
    _, output = flatten(CASES[case])
    img = _mkfs(output, tmp_path)
    e2fsck_clean(img)
    want = apply_layers([build_tar(list(layer)) for layer in CASES[case]])
    assert compare_trees(want, read_disk_tree(img), ignore_fields={"xattrs"}) == []


@_needs_mke2fs
def test_mke2fs_keeps_capability_and_fixups_cover_the_rest(tmp_path: Path) -> None:
    from support.disk import read_disk_tree

    tree, output = flatten(CASES["xattrs"])
    disk = read_disk_tree(_mkfs(output, tmp_path))
    assert disk["/ping"].xattrs == {"security.capability": CAP}
    assert disk["/u"].xattrs == {}  # mke2fs drops user.*/trusted.*: hence the fixups
    assert {(f.path, f.name, f.value) for f in tree.xattr_fixups} == {
        (b"/u", "user.bin", b"\x00\xff\x01"),
        (b"/u", "trusted.t", b"\xfe"),
        (b"/dir", "user.d", b"v"),
    }


def test_merger_takes_layers_in_order_and_matches_merge() -> None:
    layers = [
        [d("a"), file("a/x", b"1")],
        [whiteout("a/x"), file("a/y", b"2")],
    ]
    scans = [scan_layer(io.BytesIO(build_tar(entries)), i) for i, entries in enumerate(layers)]
    merger = Merger()
    with pytest.raises(ValueError, match="not in order"):
        merger.add(scans[1])
    for scan in scans:
        merger.add(scan)
    assert merger.tree() == merge(scans)
    assert [n.primary for n in merger.tree().files] == [b"a/y"]


def test_merger_refuses_the_layer_that_crosses_an_image_limit() -> None:
    one = scan_layer(io.BytesIO(build_tar([file(f"f{i}") for i in range(3)])), 0)
    two = scan_layer(io.BytesIO(build_tar([file(f"g{i}") for i in range(3)])), 1)
    merger = Merger(Limits(max_entries=4))
    merger.add(one)
    with pytest.raises(LimitExceeded, match=r"at least 6 entries \(counted up to layer 1\)"):
        merger.add(two)


def test_pull_scans_merge_as_they_arrive_out_of_order() -> None:
    # convert.LayerScans is the pull's tap: layers finish in any order and are
    # merged once every layer below them is in; the result is merge()'s.
    import gzip

    from hypeman_images.build.convert import LayerScans
    from hypeman_images.oci.digest import Digest
    from hypeman_images.oci.spec import Descriptor

    layers = [
        [d("a"), file("a/x", b"1"), file("a/z", b"3")],
        [whiteout("a/x"), file("a/y", b"2")],
        [opaque("a"), file("a/w", b"4")],
    ]
    blobs = [gzip.compress(build_tar(entries), mtime=0) for entries in layers]
    descriptors = [
        Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", Digest.of(b), len(b))
        for b in blobs
    ]
    scans = LayerScans()
    merged_after = []
    for index in (2, 0, 1):
        scans(index, descriptors[index], io.BytesIO(blobs[index]))
        merged_after.append(scans._merger.layers)
    assert merged_after == [0, 1, 3]  # layer 2 waits for 1; 1 brings both in
    got = [scans.get(i) for i in range(3)]
    assert all(got)
    expected = merge([scan_layer(io.BytesIO(build_tar(e)), i) for i, e in enumerate(layers)])
    tree = scans.merged([s for s in got if s is not None])
    assert tree == expected
    assert [n.primary for n in tree.files] == [b"a/w"]


def test_entries_of_a_layer_share_their_modes_and_mtimes_up_to_a_bound() -> None:
    from hypeman_images.layers.scan import SHARED_MAX

    same = [file(f"f{i}", b"", mode=0o644, mtime=1_700_000_000) for i in range(50)]
    scan = scan_layer(io.BytesIO(build_tar(same)), 0)
    assert len({id(e.mode) for e in scan.entries}) == 1
    assert len({id(e.mtime) for e in scan.entries}) == 1
    # A layer of all-different mtimes keeps them (equal values, not a bigger table).
    many = [file(f"g{i}", b"", mtime=1_700_000_000 + i) for i in range(SHARED_MAX + 10)]
    scan = scan_layer(io.BytesIO(build_tar(many)), 0)
    assert [e.mtime for e in scan.entries] == [1_700_000_000 + i for i in range(SHARED_MAX + 10)]
