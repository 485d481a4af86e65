"""The scan cache: pass 1's layer scans kept by blob digest and reused.

Unit tests round-trip real scans of awkward layers and refuse damaged or
doctored files; the integration tests pull from the real registry and show
that a new image over cached blobs is not scanned again, yet gives the same
disk, byte for byte, as a cold pull.
"""

from __future__ import annotations

import dataclasses
import io
import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from support import sparse
from support.hostile import diff_id_mismatch
from support.images import Image, make_image, make_layer, sha256_digest
from support.multilayer import CAP_NET_RAW
from support.push import push_image
from support.pushed import PushedImage
from support.registry import RegistryServer
from support.tar import (
    TarEntry,
    block_device,
    build_tar,
    char_device,
    directory,
    fifo,
    file,
    hardlink,
    opaque,
    raw,
    symlink,
    whiteout,
)

from hypeman_images.build import convert
from hypeman_images.build.manager import ImageManager
from hypeman_images.build.options import BuildOptions
from hypeman_images.build.pipeline import BuildStats
from hypeman_images.errors import LayerError
from hypeman_images.fsutil import temp_name
from hypeman_images.layers import scancache
from hypeman_images.layers.entries import Entry, Kind, LayerScan
from hypeman_images.layers.limits import Limits
from hypeman_images.layers.scan import scan_layer
from hypeman_images.layers.scancache import FORMAT_VERSION, ScanCache, decode, encode
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.spec import Descriptor
from hypeman_images.store.blobs import BlobStore

GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
BLOB = Digest("sha256", "ab" * 32)
LAYER = Descriptor(GZIP, BLOB, 1234)
NON_UTF8 = b"caf\xe9/\xff\xfe name"


def awkward_entries() -> list[TarEntry]:
    return [
        directory("./"),
        directory(b"caf\xe9"),
        file(NON_UTF8, b"latin-1 name\n", uid=3_000_000, gid=100_000),
        file(
            "bin/ping",
            b"ping\n",
            mode=0o4755,
            mtime=1_700_000_000,
            xattrs={
                "security.capability": CAP_NET_RAW,
                "user.binary": b"\x00\xff\x80\n=\x00",
                "user.empty": b"",
            },
        ),
        hardlink("bin/ping-link", "./bin/ping"),
        hardlink(b"caf\xe9/link", NON_UTF8),
        symlink("lib", "usr/lib"),
        symlink("up", "../../etc/passwd"),
        symlink(b"odd", b"\xff\xfe target"),
        char_device("dev/null", 1, 3, mode=0o666),
        block_device("dev/sda", 8, 0, mode=0o660),
        fifo("run/pipe"),
        whiteout("etc/gone"),
        opaque("var/cache"),
        opaque("./"),
        directory("home/.hidden", mode=0o700),
        file("home/..dots", b""),
        file("d" * 150 + "/" + "e" * 200, b"long path\n"),
        file("mtime/old", b"", mtime=-1),
    ]


def scan_of(tar: bytes, index: int = 0, limits: Limits | None = None) -> LayerScan:
    return scan_layer(io.BytesIO(tar), index, name=str(BLOB), limits=limits)


def handmade(*entries: Entry, size: int = 512) -> LayerScan:
    return LayerScan(0, str(BLOB), Digest("sha256", "cd" * 32), size, tuple(entries))


# -- the format ---------------------------------------------------------------------------


def test_round_trip_of_awkward_entries() -> None:
    scan = scan_of(build_tar(awkward_entries()))
    kinds = {e.kind for e in scan.entries}
    assert kinds == set(Kind), "the layer should exercise every kind of entry"
    assert any(e.xattrs for e in scan.entries) and any(b"\xe9" in e.path for e in scan.entries)

    loaded = decode(encode(scan, LAYER, Limits()), LAYER, 3, Limits())

    assert loaded.entries == scan.entries
    assert (loaded.diff_id, loaded.size) == (scan.diff_id, scan.size)
    assert (loaded.index, loaded.name) == (3, str(BLOB))
    for mine, theirs in zip(loaded.entries, scan.entries, strict=True):
        for name in scancache.ENTRY_FIELDS:
            assert type(getattr(mine, name)) is type(getattr(theirs, name)), name


def test_round_trip_of_values_no_tar_here_spells() -> None:
    """An xattr name that is not UTF-8 (tarheader keeps it as surrogate escapes), big numbers."""
    scan = handmade(
        Entry(0, b"", Kind.DIR, mode=0o755, mtime=-(2**40)),
        Entry(
            7,
            b"f",
            Kind.FILE,
            uid=2**32 - 1,
            gid=2**32 - 1,
            size=2**40,
            offset=2**40 + 512,
            xattrs=(("user.\udcff\udce9", b"\x00" * 300), ("trusted.x", b"\xff")),
        ),
        Entry(8, b"dev/big", Kind.CHAR, devmajor=2**32 - 1, devminor=2**20),
    )
    assert decode(encode(scan, LAYER, Limits()), LAYER, 0, Limits()) == scan


def test_empty_layer_round_trips() -> None:
    scan = scan_of(build_tar([]))
    assert scan.entries == ()
    assert decode(encode(scan, LAYER, Limits()), LAYER, 0, Limits()) == scan


def test_every_entry_field_and_kind_is_recorded() -> None:
    """A field added to entries.Entry must be added here too, and FORMAT_VERSION bumped."""
    assert tuple(f.name for f in dataclasses.fields(Entry)) == scancache.ENTRY_FIELDS
    assert sorted(scancache.KIND_CODES, key=str) == sorted(Kind, key=str)
    assert len(scancache.KIND_CODES) == len(set(scancache.KIND_CODES))


def _with_version(data: bytes, version: int) -> bytes:
    return data[:8] + struct.pack("<I", version) + data[12:]


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "empty": lambda d: b"",
    "preamble-only": lambda d: d[:20],
    "truncated": lambda d: d[: len(d) // 2],
    "one-byte-short": lambda d: d[:-1],
    "one-byte-more": lambda d: d + b"\0",
    "bit-flip-in-entries": lambda d: _flip(d, len(d) - 100),
    "bit-flip-in-header": lambda d: _flip(d, 30),
    "other-magic": lambda d: b"XX" + d[2:],
    "newer-version": lambda d: _with_version(d, FORMAT_VERSION + 1),
    "older-version": lambda d: _with_version(d, FORMAT_VERSION - 1),
    "json-instead": lambda d: b'{"version": 1, "entries": []}',
    "pickle-instead": lambda d: b"\x80\x04\x95cos\nsystem\n",
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_damaged_file_is_a_miss(damage: Callable[[bytes], bytes], tmp_path: Path) -> None:
    scan = scan_of(build_tar(awkward_entries()))
    data = damage(encode(scan, LAYER, Limits()))
    with pytest.raises(ValueError):
        decode(data, LAYER, 0, Limits())
    cache = ScanCache(tmp_path)
    cache.path(BLOB).parent.mkdir(parents=True)
    cache.path(BLOB).write_bytes(data)
    assert cache.load(LAYER, 0, Limits()) is None


MISMATCH: dict[str, tuple[Descriptor, Limits]] = {
    "other-blob": (Descriptor(GZIP, Digest("sha256", "ef" * 32), 1234), Limits()),
    "other-compression": (Descriptor(ZSTD, BLOB, 1234), Limits()),
    "other-limits": (LAYER, Limits(max_entries=1_000_000)),
    "other-path-limit": (LAYER, Limits(max_path_bytes=1024)),
}


@pytest.mark.parametrize(("layer", "limits"), MISMATCH.values(), ids=MISMATCH.keys())
def test_scan_for_another_blob_or_limits_is_a_miss(layer: Descriptor, limits: Limits) -> None:
    data = encode(scan_of(build_tar(awkward_entries())), LAYER, Limits())
    with pytest.raises(ValueError, match=r"made for|made under"):
        decode(data, layer, 0, limits)


def test_a_scan_is_good_under_byte_limits_lowered_to_its_size_not_below() -> None:
    # Builds lower the byte limits to the room their disk has: that must not turn
    # every cached scan into a miss, yet a layer over today's limit never loads.
    scan = scan_of(build_tar(awkward_entries()))
    data = encode(scan, LAYER, Limits())
    assert decode(data, LAYER, 0, Limits().within(scan.size)) == scan
    with pytest.raises(ValueError, match="size"):
        decode(data, LAYER, 0, Limits().within(scan.size - 1))


DOCTORED: dict[str, Entry] = {
    "parent-path": Entry(0, b"../etc/passwd", Kind.FILE),
    "inner-parent": Entry(0, b"a/../../etc", Kind.FILE),
    "bare-dotdot": Entry(0, b"..", Kind.DIR),
    "absolute": Entry(0, b"/etc/passwd", Kind.FILE),
    "double-slash": Entry(0, b"a//b", Kind.FILE),
    "trailing-slash": Entry(0, b"a/", Kind.DIR),
    "dot-segment": Entry(0, b"a/./b", Kind.FILE),
    "dot": Entry(0, b".", Kind.DIR),
    "nul-in-path": Entry(0, b"a\0b", Kind.FILE),
    "nul-in-target": Entry(0, b"l", Kind.SYMLINK, target=b"a\0b"),
    "hardlink-out": Entry(0, b"l", Kind.LINK, target=b"../../etc/shadow"),
    "hardlink-absolute": Entry(0, b"l", Kind.LINK, target=b"/etc/shadow"),
    "empty-symlink": Entry(0, b"l", Kind.SYMLINK, target=b""),
    "path-over-limit": Entry(0, b"p" * 5000, Kind.FILE),
    "target-over-limit": Entry(0, b"l", Kind.SYMLINK, target=b"t" * 5000),
}


@pytest.mark.parametrize("entry", DOCTORED.values(), ids=DOCTORED.keys())
def test_doctored_entries_are_refused(entry: Entry) -> None:
    """A well-formed file (valid checksum) holding what pass 1 never makes is a miss too."""
    scan = handmade(Entry(0, b"ok/.dotfile", Kind.FILE), entry)
    with pytest.raises(ValueError):
        decode(encode(scan, LAYER, Limits()), LAYER, 0, Limits())


def test_too_many_entries_for_the_limits_is_a_miss() -> None:
    scan = handmade(*(Entry(i, b"f%d" % i, Kind.FILE) for i in range(10)))
    limits = Limits(max_entries=5)
    with pytest.raises(ValueError, match="entry count"):
        decode(encode(scan, LAYER, limits), LAYER, 0, limits)


def test_value_the_format_cannot_hold_is_not_saved(tmp_path: Path) -> None:
    cache = ScanCache(tmp_path)
    scan = handmade(Entry(0, b"f", Kind.FILE, uid=2**32))
    assert not cache.save(LAYER, scan, Limits())
    assert not cache.path(BLOB).exists()
    assert list(tmp_path.rglob("*.tmp*")) == [] and list(tmp_path.rglob(".tmp-*")) == []


def test_a_layer_with_sparse_files_is_not_saved(tmp_path: Path) -> None:
    """The format has no place for a sparse map: such a layer is scanned each time."""
    cache = ScanCache(tmp_path)
    scan = scan_of(build_tar([raw(sparse.member("s", "pax-1.0"))]))
    assert scan.entries[0].size == sparse.SIZE
    assert not cache.save(LAYER, scan, Limits())
    assert not cache.path(BLOB).exists()


def test_save_then_load_overwrites_atomically(tmp_path: Path) -> None:
    cache = ScanCache(tmp_path / "scans")
    scan = scan_of(build_tar(awkward_entries()))
    assert cache.load(LAYER, 0, Limits()) is None
    assert cache.save(LAYER, scan, Limits())
    assert cache.path(BLOB) == tmp_path / "scans" / "sha256" / BLOB.encoded
    assert cache.load(LAYER, 2, Limits()) == dataclasses.replace(scan, index=2)
    other = handmade(Entry(0, b"x", Kind.FILE))
    assert cache.save(LAYER, other, Limits())
    assert cache.load(LAYER, 0, Limits()) == other
    assert sorted(p.name for p in cache.path(BLOB).parent.iterdir()) == [BLOB.encoded]


def test_gc_removes_scans_of_gone_blobs_and_dead_temp_files(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "cache")
    kept = blobs.put(Descriptor(GZIP, Digest.of(b"kept"), 4), b"kept")
    assert kept.name == Digest.of(b"kept").encoded
    cache = ScanCache.beside(blobs)
    scan = handmade(Entry(0, b"f", Kind.FILE))
    for data in (b"kept", b"gone"):
        assert cache.save(Descriptor(GZIP, Digest.of(data), 4), scan, Limits())
    root = cache.root / "sha256"
    dead = root / ".tmp-x.999999999.abcd"  # no such pid
    dead.write_bytes(b"12345")
    alive = temp_name(cache.path(Digest.of(b"kept")))
    alive.write_bytes(b"in progress")
    (root / "junk").write_bytes(b"??")
    # What gc frees is the blocks the files held, not the bytes in them.
    doomed = (cache.path(Digest.of(b"gone")), dead, root / "junk")
    allocated = sum(p.stat().st_blocks * 512 for p in doomed)

    removed, freed = cache.gc(blobs)

    assert removed == 2  # the scan of the gone blob, and the junk
    assert freed == allocated > 0
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [Digest.of(b"kept").encoded, alive.name]
    )
    assert ScanCache(tmp_path / "nowhere").gc(blobs) == (0, 0)


# -- in the pipeline ----------------------------------------------------------------------

# The scan cache serves the two-pass way (images built in one pass read every
# layer anyway, and only save the scans they make): these builds take it.
TWO_PASS = BuildOptions(one_pass=False)


def retagged(image: Image) -> Image:
    """The same config and layers under another manifest digest (an annotation more)."""
    manifest = json.loads(image.manifest)
    manifest["annotations"] = {"org.example.scancache": "retag"}
    return dataclasses.replace(image, manifest=json.dumps(manifest).encode())


@pytest.fixture(scope="module")
def multilayer_retag(multilayer_ref: PushedImage) -> str:
    image = retagged(multilayer_ref.image)
    push_image(multilayer_ref.registry.url, multilayer_ref.repository, "scan-retag", image)
    return f"{multilayer_ref.registry.host}/{multilayer_ref.repository}:scan-retag"


class Scans:
    """Counts pass 1's scans (in the tap or from the cached blob); can forbid them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self.forbidden = False
        real = convert.scan_layer

        def counting(stream: BinaryIO, index: int, **kw: Any) -> LayerScan:
            self.calls += 1
            if self.forbidden:
                raise AssertionError("pass 1 ran although the scan cache had the layer")
            return real(stream, index, **kw)

        monkeypatch.setattr(convert, "scan_layer", counting)


@pytest.fixture
def scans(monkeypatch: pytest.MonkeyPatch) -> Iterator[Scans]:
    yield Scans(monkeypatch)


def scan_files(data_dir: Path) -> list[Path]:
    root = data_dir / "cache" / scancache.SCANS_DIR
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def layer_digests(image: Image) -> list[Digest]:
    return [Digest.parse(layer.digest) for layer in image.layers]


def test_new_tag_over_cached_blobs_reuses_scans_and_gives_the_same_disk(
    multilayer_ref: PushedImage, multilayer_retag: str, scans: Scans, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    with ImageManager(shared, options=TWO_PASS) as manager:
        manager.pull(multilayer_ref.ref)
    layers = layer_digests(multilayer_ref.image)
    assert scans.calls == len(layers)
    assert [p.name for p in scan_files(shared)] == sorted(d.encoded for d in layers)

    scans.forbidden = True
    stats = BuildStats()
    with ImageManager(shared, options=TWO_PASS) as manager:
        warm = manager.pull(multilayer_retag, stats=stats)
    assert stats.cached_blobs == len(layers) and stats.downloaded_bytes == 0
    assert not stats.reused, "a new manifest digest must be converted, not reused"

    scans.forbidden = False
    with ImageManager(tmp_path / "cold", options=TWO_PASS) as manager:
        cold = manager.pull(multilayer_retag)
    assert scans.calls == 2 * len(layers)
    assert cold.disk.parent.name == warm.disk.parent.name
    assert warm.disk.read_bytes() == cold.disk.read_bytes()


DAMAGED_FILE: dict[str, Callable[[bytes], bytes]] = {
    "truncated": DAMAGE["truncated"],
    "corrupt": DAMAGE["bit-flip-in-entries"],
    "wrong-version": DAMAGE["newer-version"],
}


@pytest.mark.parametrize("damage", DAMAGED_FILE.values(), ids=DAMAGED_FILE.keys())
def test_damaged_scan_file_is_rescanned_and_rewritten(
    alpine_ref: PushedImage, data_dir: Path, scans: Scans, damage: Callable[[bytes], bytes]
) -> None:
    with ImageManager(data_dir, options=TWO_PASS) as manager:
        manager.pull(alpine_ref.ref)
        [path] = scan_files(data_dir)
        good = path.read_bytes()
        path.write_bytes(damage(good))
        manager.delete(alpine_ref.ref)
        again = manager.pull(alpine_ref.ref)
    assert scans.calls == 2
    assert path.read_bytes() == good
    assert again.disk.is_file()


def test_other_limits_rescan_and_overwrite(
    alpine_ref: PushedImage, data_dir: Path, scans: Scans
) -> None:
    with ImageManager(data_dir, options=TWO_PASS) as manager:
        manager.pull(alpine_ref.ref)
        manager.delete(alpine_ref.ref)
    other = Limits(max_entries=1_000_000)
    with ImageManager(data_dir, options=BuildOptions(limits=other, one_pass=False)) as manager:
        manager.pull(alpine_ref.ref)
    assert scans.calls == 2
    [layer] = alpine_ref.image.layers
    descriptor = Descriptor(layer.media_type, Digest.parse(layer.digest), layer.size)
    cache = ScanCache(data_dir / "cache" / scancache.SCANS_DIR)
    assert cache.load(descriptor, 0, other) is not None
    assert cache.load(descriptor, 0, Limits()) is None


def test_rm_keeps_scans_and_gc_removes_them_with_their_blobs(
    alpine_ref: PushedImage, data_dir: Path
) -> None:
    with ImageManager(data_dir, options=TWO_PASS) as manager:
        manager.pull(alpine_ref.ref)
        [scan] = scan_files(data_dir)
        stale = scan.with_name(".tmp-x.999999999.abcd")
        stale.write_bytes(b"left by a crash")
        manager.delete(alpine_ref.ref)
        assert scan.exists(), "rm leaves the cache to gc"
        blob_bytes = sum(len(layer.blob) for layer in alpine_ref.image.layers)
        report = manager.gc()
    assert report.scans_removed == 1
    assert report.bytes_freed >= blob_bytes + len(b"left by a crash")
    assert scan_files(data_dir) == []


def test_scan_is_never_saved_when_the_diff_id_mismatches(
    registry: RegistryServer, data_dir: Path, tmp_path: Path
) -> None:
    url, host = registry.url, registry.host
    case = diff_id_mismatch(tmp_path)
    case.push(url, "scancache/bad-diff-id", "v1")
    with (
        ImageManager(data_dir, options=TWO_PASS) as manager,
        pytest.raises(LayerError, match="diff_ids"),
    ):
        manager.pull(f"{host}/scancache/bad-diff-id:v1")
    assert scan_files(data_dir) == []


def test_cached_scan_is_still_checked_against_each_config(
    registry: RegistryServer, data_dir: Path
) -> None:
    """A blob scanned for a sound image does not vouch for a config that lies about it."""
    url, host = registry.url, registry.host
    layer = make_layer([file("x", b"x\n")])
    push_image(url, "scancache/sound", "v1", make_image([layer]))
    lying = make_image(
        [layer], config_extra={"rootfs": {"type": "layers", "diff_ids": [sha256_digest(b"")]}}
    )
    push_image(url, "scancache/lying", "v1", lying)
    with ImageManager(data_dir, options=TWO_PASS) as manager:
        manager.pull(f"{host}/scancache/sound:v1")
        [path] = scan_files(data_dir)
        saved = path.read_bytes()
        with pytest.raises(LayerError, match="diff_ids"):
            manager.pull(f"{host}/scancache/lying:v1")
    assert path.read_bytes() == saved


def test_scan_files_are_readable_without_the_code() -> None:
    """The header is plain JSON after the preamble: what a person debugging needs."""
    data = encode(scan_of(build_tar(awkward_entries())), LAYER, Limits())
    magic, version, _crc, head_len = struct.unpack_from("<8sIII", data)
    header = json.loads(data[20 : 20 + head_len])
    assert magic.startswith(b"HMSCAN") and version == FORMAT_VERSION
    assert header["blob"] == str(BLOB) and header["compression"] == "gzip"
    # Not recorded: a build's own byte limits, and the image's layer count.
    unrecorded = ("max_layer_bytes", "max_image_bytes", "max_layers")
    assert header["limits"] == {
        k: v for k, v in dataclasses.asdict(Limits()).items() if k not in unrecorded
    }


def test_a_rotten_blob_behind_a_cached_scan_is_downloaded_again(
    multilayer_ref: PushedImage, multilayer_retag: str, scans: Scans, tmp_path: Path
) -> None:
    # With the scan cached, no pass reads the whole blob: the pull checks its
    # digest instead, and fetches a blob that no longer matches it again.
    data_dir = tmp_path / "data"
    with ImageManager(tmp_path / "cold", options=TWO_PASS) as manager:
        cold = manager.pull(multilayer_retag)
    with ImageManager(data_dir, options=TWO_PASS) as manager:
        manager.pull(multilayer_ref.ref)
    layer = multilayer_ref.image.layers[-1]
    blob = data_dir / "cache" / "blobs" / "sha256" / layer.digest[7:]
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))

    scans.forbidden = True
    stats = BuildStats()
    with ImageManager(data_dir, options=TWO_PASS) as manager:
        again = manager.pull(multilayer_retag, stats=stats)
    assert stats.downloaded_bytes == layer.size
    assert stats.cached_blobs == len(multilayer_ref.image.layers) - 1
    assert Digest.of(blob.read_bytes()) == Digest.parse(layer.digest)
    assert again.disk.read_bytes() == cold.disk.read_bytes()
