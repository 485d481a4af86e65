"""The EROFS one pass (build/onepass_erofs.py): taken, exact, the same bytes however layers come.

The one pass writes each body as its layer inflates, top layer first, so its
data area is laid out as the two passes lay theirs out: the disks are byte
for byte the same, whichever layer arrives first, whether the blobs or their
scans were cached, and as the two passes make it. A layer that names a
regular file twice is the one exception: its one-pass disk keeps the first
body's blocks, unreferenced, and is as reproducible. What the writer refuses,
the two passes refuse, with their message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from pathlib import Path

import pytest
from support import sparse
from support.disk import compare_trees
from support.erofs_check import fsck
from support.erofs_disk import kept_xattrs, read_erofs_tree
from support.faultproxy import Fault, fault_proxy
from support.images import Image, make_image, make_layer, push_image
from support.oracle import apply_layers
from support.registry import RegistryServer
from support.tar import TarEntry, directory, file, hardlink, opaque, raw, symlink, whiteout
from test_erofs_builds import cli_pull, pull_erofs

from hypeman_images.build.manager import ImageManager
from hypeman_images.build.options import BuildOptions
from hypeman_images.disk.erofs import ErofsInputError
from hypeman_images.store.formats import DiskFormat

T = 1_700_000_000
CAP = bytes.fromhex("0100000200200000000000000000000000000000")


def _noise(seed: int, n: int) -> bytes:
    """Bytes gzip cannot shrink: the layers stay within the one pass's 32x bound."""
    return random.Random(seed).randbytes(n)


def _layers() -> list[list[TarEntry]]:
    hole = 3 << 20  # a sparse file: 192 KiB of data, 3 MiB of holes
    runs = ((0, _noise(1, 128 << 10)), (hole, _noise(2, 64 << 10)))
    bottom = [
        directory("etc", mtime=T),
        file("etc/passwd", b"root:x:0:0\n", mtime=T),
        directory("usr/lib", mode=0o750, uid=3, mtime=T + 5),
        file("usr/lib/big", _noise(3, 5 << 20), mtime=T),
        file("usr/lib/gone", _noise(4, 9000), mtime=T),
        directory("var/cache", mtime=T),
        file("var/cache/old", b"old", mtime=T),
        raw(sparse.member("data/sparse", "pax-1.0", runs=runs, size=hole + (1 << 20))),
    ]
    middle = [
        file("usr/bin/tool", _noise(5, 70_000), mode=0o755, mtime=T + 1, xattrs={
            "security.capability": CAP, "user.note": b"x" * 200}),
        hardlink("usr/bin/tool2", "usr/bin/tool"),
        hardlink("usr/bin/tool3", "usr/bin/tool"),
        whiteout("usr/lib/gone"),
        directory("var/cache", mtime=T + 3),  # as docker writes an opaque directory
        opaque("var/cache"),
        file("var/cache/new", b"new", mtime=T),
        symlink("etc/alias", "passwd"),
    ]  # fmt: skip
    top = [
        file("etc/passwd", b"root:x:0:0\nuser:x:1000:1000\n", mode=0o600, mtime=T + 2),
        directory("usr/lib", mode=0o755, mtime=T + 9),  # new metadata, children kept
        file("usr/lib/tail", _noise(6, 4097), mtime=T),
        file("empty", b"", mtime=T),
    ]
    return [bottom, middle, top]


@pytest.fixture(scope="module")
def pushed(registry: RegistryServer) -> tuple[str, Image, list[list[TarEntry]]]:
    layers = _layers()
    image = make_image([make_layer(layer) for layer in layers])
    push_image(registry.url, "erofs/one-pass", "v1", image)
    return "erofs/one-pass:v1", image, layers


def _blob_file(data_dir: Path, digest: str) -> Path:
    return data_dir / "cache" / "blobs" / "sha256" / digest.split(":")[1]


def test_the_same_bytes_whatever_arrives_first(
    pushed: tuple[str, Image, list[list[TarEntry]]], registry: RegistryServer, tmp_path: Path
) -> None:
    name, image, layers = pushed
    ref = f"{registry.host}/{name}"
    first, stats = pull_erofs(tmp_path / "first", ref)
    assert "one_pass_s" in stats.stages and first.record.one_pass is True
    fsck(first.disk)
    expected = kept_xattrs(apply_layers([layer.tar for layer in image.layers]))  # type: ignore[arg-type]
    assert compare_trees(expected, read_erofs_tree(first.disk)) == []
    want = first.disk.read_bytes()
    two, _ = pull_erofs(tmp_path / "two", ref, one_pass=False)
    assert two.disk.read_bytes() == want and two.record.one_pass is False

    # The top layer held back, then the bottom one: the pass waits, in the same order.
    blobs = [layer.digest.split(":")[1] for layer in image.layers]
    for held in (blobs[-1], blobs[0]):
        with fault_proxy(registry.url) as proxy:
            proxy.add(Fault(path=held, action="delay", delay=1.0))
            slow, stats = pull_erofs(tmp_path / f"held-{held[:8]}", f"{proxy.host}/{name}")
            assert proxy.requests(held)
        assert "one_pass_s" in stats.stages and slow.disk.read_bytes() == want

    # Some blobs cached already: the bottom one, then all but the bottom one.
    for cached in ([0], [1, 2]):
        data_dir = tmp_path / f"cached-{'-'.join(map(str, cached))}"
        for index in cached:
            source = _blob_file(tmp_path / "first", image.layers[index].digest)
            target = data_dir / source.relative_to(tmp_path / "first")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        again, stats = pull_erofs(data_dir, ref)
        assert stats.cached_blobs == len(cached) and "one_pass_s" in stats.stages
        assert again.disk.read_bytes() == want

    # Every scan cached (by the two passes): the pass reads bodies by their offsets.
    with ImageManager(tmp_path / "two") as manager:
        manager.delete(ref)
    known, stats = pull_erofs(tmp_path / "two", ref)
    assert stats.cached_blobs == len(layers) and "one_pass_s" in stats.stages
    assert known.disk.read_bytes() == want


def test_a_file_named_twice_in_a_layer_keeps_its_first_body_unreferenced(
    registry: RegistryServer, tmp_path: Path
) -> None:
    layers = [
        [directory("d", mtime=T), file("d/f", _noise(7, 20_000), mtime=T)],
        [file("d/f", _noise(8, 30_000), mtime=T), file("d/f", b"last", mtime=T + 1)],
    ]
    image = make_image([make_layer(layer) for layer in layers])
    push_image(registry.url, "erofs/twice", "v1", image)
    ref = f"{registry.host}/erofs/twice:v1"
    one, stats = pull_erofs(tmp_path / "one", ref)
    two, _ = pull_erofs(tmp_path / "two", ref, one_pass=False)
    again, _ = pull_erofs(tmp_path / "again", ref)
    assert "one_pass_s" in stats.stages
    expected = kept_xattrs(apply_layers([layer.tar for layer in image.layers]))  # type: ignore[arg-type]
    for disk in (one.disk, two.disk):
        fsck(disk)
        assert compare_trees(expected, read_erofs_tree(disk)) == []
    assert again.disk.read_bytes() == one.disk.read_bytes() != two.disk.read_bytes()
    # The 30,000 bytes written and then replaced: 7 blocks, or 8 with a tail block.
    assert one.disk.stat().st_size - two.disk.stat().st_size in (7 * 4096, 8 * 4096)


def test_what_the_writer_refuses_is_refused_as_the_two_passes_refuse_it(
    registry: RegistryServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    layers = [[file("f", _noise(9, 5000), xattrs={"user.big": b"v" * 70_000})]]
    image = make_image([make_layer(layer) for layer in layers])
    push_image(registry.url, "erofs/refused", "v1", image)
    ref = f"{registry.host}/erofs/refused:v1"
    caplog.set_level(logging.INFO, logger="hypeman_images.build.convert")
    messages = []
    for way in (True, False):
        options = BuildOptions(format=DiskFormat.EROFS, one_pass=way)
        with (
            ImageManager(tmp_path / str(way), options=options) as manager,
            pytest.raises(ErofsInputError, match="over 65535 bytes") as caught,
        ):
            manager.pull(ref)
        messages.append(str(caught.value))
        leftovers = [p.name for p in (tmp_path / str(way)).rglob("*rootfs*")]
        assert leftovers == []
    assert messages[0] == messages[1]
    assert "building in two passes" in caplog.text and "EROFS writer refuses" in caplog.text


def test_the_cli_two_pass_flag_gives_the_same_disk(
    pushed: tuple[str, Image, list[list[TarEntry]]], registry: RegistryServer, tmp_path: Path
) -> None:
    name, _, _ = pushed
    docs = []
    for way in ((), ("--two-pass",)):
        folder = tmp_path / ("two" if way else "one")
        result = cli_pull(folder, "--json", "--format", "erofs", *way, f"{registry.host}/{name}")
        assert result.returncode == 0, result.stderr
        docs.append(json.loads(result.stdout))
    assert docs[0]["disk_sha256"] == docs[1]["disk_sha256"]
    disk = Path(docs[0]["disk"])
    assert docs[0]["disk_sha256"] == "sha256:" + hashlib.sha256(disk.read_bytes()).hexdigest()


def test_the_recorded_sha256_is_the_disks_either_way(
    registry: RegistryServer, tmp_path: Path
) -> None:
    """The hash starts on the image's head while the metadata is written (docs/design.md,
    "EROFS disks"): here metadata over many blocks, after a data area that ends with a
    chunked sparse file. ``pull_erofs`` compares each recorded digest with the file's."""
    hole = 3 << 20
    runs = ((0, _noise(10, 60 << 10)), (hole, _noise(11, 60 << 10)))
    dirs = [directory(f"d{i:03d}", mtime=T + i) for i in range(400)]
    files = [file(f"d{i:03d}/f", _noise(i, i * 37), mtime=T) for i in range(400)]
    layers = [  # the bottom layer's files go last in the data area (files_top_first)
        [
            file("z/noise", _noise(12, 1 << 20), mtime=T),  # 32x its gzip covers the 4 MiB below
            raw(sparse.member("z/sparse", "pax-1.0", runs=runs, size=hole + (1 << 20))),
        ],
        [*dirs, *files],
    ]
    image = make_image([make_layer(layer) for layer in layers])
    push_image(registry.url, "erofs/hashed", "v1", image)
    ref = f"{registry.host}/erofs/hashed:v1"
    one, stats = pull_erofs(tmp_path / "one", ref)
    two, _ = pull_erofs(tmp_path / "two", ref, one_pass=False)
    assert "one_pass_s" in stats.stages
    assert one.record.disk_sha256 == two.record.disk_sha256
    assert one.disk.read_bytes() == two.disk.read_bytes()
    expected = kept_xattrs(apply_layers([layer.tar for layer in image.layers]))  # type: ignore[arg-type]
    assert compare_trees(expected, read_erofs_tree(one.disk)) == []
