"""The one-pass build (layers.onepass): the merge's tree, or a fallback, never a third.

Every flatten case and random stacks go through :class:`TopDown`: either it
raises :class:`Speculation` (the build then takes the two-pass way), or the
stream it wrote, applied the way mke2fs applies a tar (repeated directories
update metadata, repeated files replace, hard links share the inode of the
moment), is the tree the oracle makes of the layers -- and its own check
against :func:`merge.merge` agrees. Real mke2fs reads the streams of the
cases, and real pulls compare one-pass disks with two-pass ones.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import logging
import os
import random
import shutil
import subprocess
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from support import sparse
from support.cases import CASES, Layers, d
from support.cases import ONE_PASS_FALLS_BACK as FALLS_BACK
from support.disk import compare_trees, e2fsck_clean, read_disk_tree
from support.images import Compression, make_image, make_layer, push_image
from support.oracle import apply_layers
from support.pushed import PushedImage
from support.registry import RegistryServer
from support.tar import build_tar, file, hardlink, raw, symlink
from test_flatten import _stacks, flatten

from hypeman_images.build.manager import ImageManager
from hypeman_images.build.onepass import uncompressed_size
from hypeman_images.build.options import BuildOptions
from hypeman_images.build.pipeline import BuildStats
from hypeman_images.disk import check, mke2fs, sizing
from hypeman_images.errors import LayerError
from hypeman_images.layers import onepass as topdown
from hypeman_images.layers.compression import Hasher
from hypeman_images.layers.entries import LayerScan
from hypeman_images.layers.merge import merge
from hypeman_images.layers.onepass import Speculation, TopDown
from hypeman_images.layers.survivors import TarStream
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.spec import Descriptor

# The oracle keeps sockets and drops escaping paths (we skip one, clamp the other),
# as in test_flatten: the one pass of these is checked by mke2fs and the merge only.
ORACLE_DIFFERS = {"hostile_names", "devices_fifos", "whiteouts_stored_as_link_and_chardev"}


class _Hashing(io.BytesIO):
    """A layer for :class:`TopDown`: its bytes, hashed as the read-ahead thread would."""

    def __init__(self, data: bytes, hasher: Hasher) -> None:
        super().__init__(data)
        hasher.update(data)


def one_pass(tars: Sequence[bytes]) -> tuple[bytes, list[LayerScan], TopDown]:
    """Run the single pass over uncompressed layer tars; its stream, scans and state."""
    top = TopDown(lambda i, h: _Hashing(tars[i], h), [f"L{i}" for i in range(len(tars))])
    out = io.BytesIO()
    scans = top.run(TarStream(out))
    return out.getvalue(), scans, top


def outcome(layers: Layers | Sequence[bytes]) -> bytes | None:
    """The checked one-pass stream, or None where the pass falls back."""
    tars = [t if isinstance(t, bytes) else build_tar(list(t)) for t in layers]
    try:
        stream, scans, top = one_pass(tars)
        tree = merge(scans)
        top.check(tree)
    except Speculation:
        return None
    # What sized the disk before the merge was done is the merge's, exactly.
    assert top.planned() == (tree.stats, tree.xattr_fixups)
    return stream


@pytest.mark.parametrize("case", sorted(CASES))
def test_case_is_the_merge_or_falls_back(case: str) -> None:
    stream = outcome(CASES[case])
    assert (stream is None) == (case in FALLS_BACK), "falls back" if stream is None else "passes"
    if stream is None or case in ORACLE_DIFFERS:
        return
    want = apply_layers([build_tar(list(layer)) for layer in CASES[case]])
    got = apply_layers([stream])
    assert compare_trees(want, got, ignore_fields={"xattrs"}) == []  # fixups: not in the stream


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_stacks)
def test_random_stacks_are_the_merge_or_fall_back(stack: list[list[object]]) -> None:
    tars = [build_tar(layer) for layer in stack]  # type: ignore[arg-type]
    try:
        want = apply_layers(tars)
    except ValueError:
        return  # ambiguous in the spec; the merge refuses it (test_flatten)
    try:
        stream = outcome(tars)
    except LayerError:
        # A refusal must be the two-pass way's too: the one pass never falls back on it.
        with pytest.raises(LayerError):
            flatten(tars)
        return
    if stream is not None:
        assert compare_trees(want, apply_layers([stream]), ignore_fields={"xattrs"}) == []


def test_check_catches_a_stream_that_differs_from_the_plan() -> None:
    tars = [build_tar([d("a"), file("a/x", b"1")]), build_tar([file("a/y", b"2")])]
    _, scans, top = one_pass(tars)
    other = merge([scans[0]])  # the plan of the bottom layer alone
    with pytest.raises(Speculation, match="paths differ"):
        top.check(other)


def test_check_catches_a_plan_that_differs_from_the_merge() -> None:
    tars = [build_tar([d("a"), file("a/x", b"1")]), build_tar([file("a/y", b"2")])]
    _, scans, top = one_pass(tars)
    top.planned()
    tree = merge(scans)
    stats = dataclasses.replace(tree.stats, regular_bytes=tree.stats.regular_bytes + 1)
    with pytest.raises(Speculation, match="stats or xattr fixups differ"):
        top.check(dataclasses.replace(tree, stats=stats))


def test_lower_directory_metadata_reaches_a_parent_the_layer_above_implied() -> None:
    # The top layer writes etc/x without an etc/ entry: etc is implied 0755
    # root, then the bottom layer's etc/ (0700, uid 5) must set it.
    tars = [build_tar([d("etc", mode=0o700, uid=5)]), build_tar([file("etc/x", b"x")])]
    stream, scans, top = one_pass(tars)
    top.check(merge(scans))
    etc = apply_layers([stream])["/etc"]
    assert (etc.mode & 0o7777, etc.uid) == (0o700, 5)


_needs_mke2fs = pytest.mark.skipif(shutil.which("mke2fs") is None, reason="needs e2fsprogs")


@_needs_mke2fs
@pytest.mark.parametrize(
    "case", sorted(set(CASES) - FALLS_BACK - ORACLE_DIFFERS - {"odd_names", "deep_path"})
)
def test_mke2fs_makes_the_tree_of_the_stream(case: str, tmp_path: Path) -> None:
    stream = outcome(CASES[case])
    assert stream is not None
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-b", "4096", "-d", "-",
         str(img)],
        input=stream, check=True, capture_output=True,
    )  # fmt: skip
    e2fsck_clean(img)
    want = apply_layers([build_tar(list(layer)) for layer in CASES[case]])
    assert compare_trees(want, read_disk_tree(img), ignore_fields={"xattrs"}) == []


# -- the uncompressed size that sizes the disk ---------------------------------------------

GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
TAR = "application/vnd.oci.image.layer.v1.tar"
ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"


def _blob(tmp_path: Path, data: bytes, media_type: str) -> tuple[Path, Descriptor]:
    path = tmp_path / "blob"
    path.write_bytes(data)
    return path, Descriptor(media_type, Digest.of(data), len(data))


def test_uncompressed_size_of_gzip_and_plain_layers(tmp_path: Path) -> None:
    tar = build_tar([file("a", bytes(range(256)) * 64)])
    assert uncompressed_size(*_blob(tmp_path, gzip.compress(tar), GZIP)) == len(tar)
    assert uncompressed_size(*_blob(tmp_path, tar, TAR)) == len(tar)


def test_uncompressed_size_is_not_guessed(tmp_path: Path) -> None:
    tar = build_tar([file("a", os.urandom(100_000))])
    # Two members: ISIZE is the last one's, far below what the blob holds.
    members = gzip.compress(tar) + gzip.compress(b"\0" * 1024)
    assert uncompressed_size(*_blob(tmp_path, members, GZIP)) is None
    assert uncompressed_size(*_blob(tmp_path, zlib.compress(tar), GZIP)) is None  # not gzip
    assert uncompressed_size(*_blob(tmp_path, b"\x28\xb5\x2f\xfd" + tar, ZSTD)) is None


# -- in the pipeline -----------------------------------------------------------------------


def _pull(data_dir: Path, ref: str, **options: object) -> tuple[Path, BuildStats]:
    stats = BuildStats()
    with ImageManager(data_dir, options=BuildOptions(**options)) as manager:  # type: ignore[arg-type]
        image = manager.pull(ref, stats=stats)
    return image.disk, stats


def test_one_pass_disk_holds_the_two_pass_tree(alpine_ref: PushedImage, tmp_path: Path) -> None:
    one, stats = _pull(tmp_path / "one", alpine_ref.ref)
    two, two_stats = _pull(tmp_path / "two", alpine_ref.ref, one_pass=False)
    assert "one_pass_s" in stats.stages and "one_pass_s" not in two_stats.stages
    assert compare_trees(read_disk_tree(two), read_disk_tree(one)) == []
    e2fsck_clean(one)
    # Shrunk to the tree: the inode tables of the full groups (8 MiB per 128 MiB
    # group, unwritten) are all it has more than the two-pass disk.
    counts = check.superblock_counts(one)
    assert one.stat().st_size == counts["Block count"] * 4096
    assert one.stat().st_size <= two.stat().st_size + 8 * 2**20
    # The same image gives the same bytes, whatever the cache holds.
    first = one.read_bytes()
    with ImageManager(tmp_path / "one") as manager:
        manager.delete(alpine_ref.ref)
    again, stats = _pull(tmp_path / "one", alpine_ref.ref)
    assert stats.cached_blobs == len(alpine_ref.image.layers) and "one_pass_s" in stats.stages
    assert again.read_bytes() == first


def _push(
    registry: RegistryServer, name: str, layers: Layers, compression: Compression = "gzip"
) -> str:
    image = make_image([make_layer(list(layer), compression) for layer in layers])
    push_image(registry.url, name, "v1", image)
    return f"{registry.host}/{name}:v1"


def test_zstd_and_plain_layers_are_built_in_one_pass_too(
    registry: RegistryServer, tmp_path: Path
) -> None:
    layers = CASES["whiteout_file"]
    kinds: tuple[Compression, ...] = ("zstd", "none")
    for compression in kinds:
        ref = _push(registry, f"topdown/{compression}", layers, compression)
        one, stats = _pull(tmp_path / f"one-{compression}", ref)
        two, _ = _pull(tmp_path / f"two-{compression}", ref, one_pass=False)
        assert "one_pass_s" in stats.stages, compression
        assert compare_trees(read_disk_tree(two), read_disk_tree(one)) == []


def test_an_image_the_pass_cannot_decide_is_built_in_two_passes(
    registry: RegistryServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    layers = [
        [d("usr"), d("usr/lib"), symlink("lib", "usr/lib"), file("usr/lib/a", b"a")],
        [file("lib/b", b"b"), hardlink("lib/c", "usr/lib/a")],
    ]
    ref = _push(registry, "topdown/symlinked-parent", layers)
    with caplog.at_level(logging.INFO, logger="hypeman_images.build.convert"):
        disk, stats = _pull(tmp_path / "data", ref)
    assert "building in two passes" in caplog.text
    assert "one_pass_tried_s" in stats.stages and "mke2fs_s" in stats.stages
    want = apply_layers([build_tar(list(layer)) for layer in layers])
    got = read_disk_tree(disk)
    assert compare_trees(want, got) == []
    assert got["/usr/lib/b"].sha256 == hashlib.sha256(b"b").hexdigest()  # through the symlink


def test_a_hard_link_whose_lower_target_its_layer_then_whites_out_keeps_the_file(
    registry: RegistryServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Pulled end to end, as docker keeps it: the one pass leaves the link to the merge."""
    layers = CASES["hardlink_to_lower_then_whiteout_same_layer"]
    ref = _push(registry, "topdown/link-then-whiteout", layers)
    with caplog.at_level(logging.INFO, logger="hypeman_images.build.convert"):
        one, _ = _pull(tmp_path / "one", ref)
    assert "reaches below" in caplog.text and "building in two passes" in caplog.text
    two, _ = _pull(tmp_path / "two", ref, one_pass=False)
    want = apply_layers([build_tar(list(layer)) for layer in layers])
    for disk in (one, two):
        e2fsck_clean(disk)
        tree = read_disk_tree(disk)
        assert compare_trees(want, tree) == []
        assert tree["/b"].sha256 == hashlib.sha256(b"lower a").hexdigest()
        assert (tree["/b"].mode, tree["/b"].uid) == (0o600, 3)
        assert not {"/a", "/d", "/d/f", "/o/g"} & set(tree)


def test_a_layer_that_inflates_past_the_sizing_is_built_in_two_passes(
    registry: RegistryServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # 8 MiB of zeros gzip to ~8 KiB: far past ONE_PASS_MAX_RATIO times the blob.
    zeros = b"\0" * (8 << 20)
    ref = _push(registry, "topdown/zeros", [[d("data"), file("data/zeros", zeros)]])
    with caplog.at_level(logging.INFO, logger="hypeman_images.build.convert"):
        disk, stats = _pull(tmp_path / "data", ref)
    assert "inflates past" in caplog.text and "building in two passes" in caplog.text
    assert "one_pass_tried_s" in stats.stages
    e2fsck_clean(disk)
    assert read_disk_tree(disk)["/data/zeros"].sha256 == hashlib.sha256(zeros).hexdigest()


def test_a_cached_layer_past_the_sizing_is_not_tried_in_one_pass(
    registry: RegistryServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With its blob whole in the cache, the layer's gzip trailer (or its cached
    scan) says at once that it inflates past the disk's sizing: the pass stops
    before writing any of it, instead of after the disk's worth. (64 MiB of
    zeros: ~64 KiB of gzip, so the sizing is more than the reader's first chunk.)"""
    zeros = b"\0" * (64 << 20)
    ref = _push(registry, "topdown/zeros-again", [[d("data"), file("data/zeros", zeros)]])
    data = tmp_path / "data"
    _pull(data, ref)
    with ImageManager(data) as manager:
        manager.delete(ref)
    for what, said in (("scan", "its scan says 6"), ("trailer", "its blob says at least 6")):
        if what == "trailer":
            with ImageManager(data) as manager:
                manager.delete(ref)
            shutil.rmtree(data / "cache" / "scans")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="hypeman_images.build.convert"):
            disk, stats = _pull(data, ref)
        assert said in caplog.text and "building in two passes" in caplog.text, what
        assert stats.cached_blobs == 1
        assert read_disk_tree(disk)["/data/zeros"].sha256 == hashlib.sha256(zeros).hexdigest()


def test_sparse_files_reach_the_disk_at_their_real_size_in_either_pass(
    registry: RegistryServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Holes count as the bytes they become: a small sparse file fits the one pass's
    sizing and goes through it; 11 MiB of holes in a ~20 KiB layer do not, and that
    image is built in two passes, as a layer of zeros would be."""
    noise = random.Random(3).randbytes(8192)
    small = sparse.member("small", "pax-1.0", runs=((0, noise), (65536, noise[:4096])), size=90000)
    ref = _push(registry, "topdown/sparse-small", [[raw(small)]])
    disk, stats = _pull(tmp_path / "small", ref)
    assert "one_pass_s" in stats.stages and "one_pass_tried_s" not in stats.stages
    e2fsck_clean(disk)
    want = sparse.content(((0, noise), (65536, noise[:4096])), 90000)
    assert read_disk_tree(disk)["/small"].sha256 == hashlib.sha256(want).hexdigest()

    ref = _push(registry, "topdown/sparse-big", CASES["sparse_files"])
    with caplog.at_level(logging.INFO, logger="hypeman_images.build.convert"):
        disk, stats = _pull(tmp_path / "big", ref)
    assert "inflates past" in caplog.text and "building in two passes" in caplog.text
    e2fsck_clean(disk)
    tree = read_disk_tree(disk)
    want_tree = apply_layers([build_tar(list(layer)) for layer in CASES["sparse_files"]])
    assert compare_trees(want_tree, tree) == []
    assert tree["/data/pax-0.0"].sha256 == hashlib.sha256(sparse.content()).hexdigest()


def test_a_disk_too_small_for_the_tree_falls_back(
    alpine_ref: PushedImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny = sizing.DiskLayout(blocks=256, inodes=64, content_blocks=0)
    monkeypatch.setattr(mke2fs, "one_pass_layout", lambda uncompressed, free_space=0: tiny)
    disk, stats = _pull(tmp_path / "data", alpine_ref.ref)
    assert "one_pass_tried_s" in stats.stages
    e2fsck_clean(disk)
    assert read_disk_tree(disk)["/etc/alpine-release"].type == "file"


def test_a_proof_that_fails_after_the_hash_falls_back_and_leaves_no_temp_disk(
    alpine_ref: PushedImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The proof comes after the disk was shrunk and hashed: a stream the merge
    # disagrees with must still never become the disk.
    proved: list[bool] = []

    def disagree(self: TopDown, tree: object) -> None:
        proved.append(True)
        raise Speculation("the merge planned another tree (test)")

    monkeypatch.setattr(TopDown, "check", disagree)
    disk, stats = _pull(tmp_path / "data", alpine_ref.ref)
    assert proved and "one_pass_tried_s" in stats.stages
    e2fsck_clean(disk)
    assert read_disk_tree(disk)["/etc/alpine-release"].type == "file"
    assert sorted(p.name for p in disk.parent.iterdir()) == [".lock", "metadata.json", disk.name]
    doc = json.loads((disk.parent / "metadata.json").read_text())
    assert doc["disk_sha256"] == "sha256:" + hashlib.sha256(disk.read_bytes()).hexdigest()


def test_a_bad_layer_fails_the_same_way_in_one_pass(
    registry: RegistryServer, tmp_path: Path
) -> None:
    layer = make_layer([file("x", b"x")])
    lying = make_image(
        [layer], config_extra={"rootfs": {"type": "layers", "diff_ids": ["sha256:" + "0" * 64]}}
    )
    push_image(registry.url, "topdown/lying", "v1", lying)
    data_dir = tmp_path / "data"
    with pytest.raises(LayerError, match="diff_ids"):
        _pull(data_dir, f"{registry.host}/topdown/lying:v1")
    leftovers = [p for p in data_dir.rglob("*") if p.is_file() and "rootfs" in p.name]
    assert leftovers == []


def test_a_layer_larger_than_the_disk_was_sized_for_stops_the_pass_at_once() -> None:
    # The pass stops where the disk's sizing ends, not at the limits (the
    # two-pass way then applies those).
    tar = build_tar([file("big", b"\0" * 65536), file("after", b"x")])
    top = TopDown(lambda i, h: _Hashing(tar, h), ["L0"], sizes={0: 4096})
    with pytest.raises(Speculation, match="inflates past the 4096 bytes the disk was sized"):
        top.run(TarStream(io.BytesIO()))


def test_a_blob_that_says_it_is_past_the_sizing_stops_the_pass_when_it_is_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The blob is asked as the layer opens and then every STATED_EVERY bytes read, until
    it answers: the pass stops at the first answer past the sizing, long before it
    reads that far (a decompression bomb), and asks no more once one fits."""
    monkeypatch.setattr(topdown, "STATED_EVERY", 8192)
    tar = build_tar([file(f"f{i}", b"x" * 3000) for i in range(20)])
    asked: list[int] = []

    def downloads_then_says(at_least: int) -> Callable[[int], int | None]:
        def stated(index: int) -> int | None:
            asked.append(index)
            return None if len(asked) < 3 else at_least

        return stated

    top = TopDown(
        lambda i, h: _Hashing(tar, h), ["L0"], sizes={0: 1 << 20},
        stated=downloads_then_says(2 << 20),
    )  # fmt: skip
    out = io.BytesIO()
    with pytest.raises(Speculation, match="its blob says at least 2097152"):
        top.run(TarStream(out))
    assert len(asked) == 3 and len(out.getvalue()) < 3 * 8192 + 4 * 3584  # stopped early

    asked.clear()
    top = TopDown(
        lambda i, h: _Hashing(tar, h), ["L0"], sizes={0: 1 << 20},
        stated=downloads_then_says(len(tar)),
    )  # fmt: skip
    top.run(TarStream(io.BytesIO()))
    assert len(asked) == 3  # answered and fitting: not asked again
