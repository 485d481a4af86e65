"""The blob cache is a valid OCI layout, and only verified blobs become visible."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hypeman_images.errors import DigestMismatch, NotFound, StorageError
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.spec import OCI_MANIFEST, Descriptor
from hypeman_images.store.blobs import BlobStore


def descriptor(data: bytes, media_type: str = "application/octet-stream") -> Descriptor:
    return Descriptor(media_type, Digest.of(data), len(data))


def test_layout_files(tmp_path: Path) -> None:
    BlobStore(tmp_path / "cache")
    layout = json.loads((tmp_path / "cache/oci-layout").read_text())
    assert layout == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((tmp_path / "cache/index.json").read_text())
    assert index["schemaVersion"] == 2 and index["manifests"] == []


def test_ingest_streams_and_verifies(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = os.urandom(3 << 20)
    desc = descriptor(data)
    seen: list[int] = []
    path = store.ingest(
        desc, (data[i : i + 65536] for i in range(0, len(data), 65536)), seen.append
    )
    assert path == tmp_path / "blobs/sha256" / desc.digest.encoded
    assert path.read_bytes() == data
    assert sum(seen) == len(data)
    assert store.has(desc.digest)
    assert list(store.digests()) == [desc.digest]


def test_wrong_bytes_leave_nothing(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    desc = descriptor(b"the real content")
    with pytest.raises(DigestMismatch):
        store.ingest(desc, [b"something else!!"])
    assert not store.has(desc.digest)
    assert list((tmp_path / "blobs/sha256").iterdir()) == []


def test_interrupted_stream_leaves_nothing(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    desc = descriptor(b"x" * 100)

    def broken():  # type: ignore[no-untyped-def]
        yield b"x" * 50
        raise ConnectionError("dropped")

    with pytest.raises(ConnectionError):
        store.ingest(desc, broken())
    assert not store.has(desc.digest)
    assert list((tmp_path / "blobs/sha256").iterdir()) == []


def test_open_missing_blob(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        BlobStore(tmp_path).open(Digest.of(b"nope"))


def test_rotten_blob_is_detected_and_removed(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    desc = descriptor(b"fine")
    path = store.put(desc, b"fine")
    path.chmod(0o644)
    path.write_bytes(b"rot!")
    with pytest.raises(DigestMismatch, match="corrupt"):
        store.verify(desc.digest)
    assert not store.has(desc.digest)


def test_index_tags_and_gc(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    keep = descriptor(b'{"keep": 1}', OCI_MANIFEST)
    drop = descriptor(b'{"drop": 1}', OCI_MANIFEST)
    store.put(keep, b'{"keep": 1}')
    store.put(drop, b'{"drop": 1}')
    store.tag(keep, "r/a:1")
    store.tag(drop, "r/a:2")
    store.tag(drop, "r/a:1")  # re-tagging replaces the old entry of that name
    names = [m["annotations"]["org.opencontainers.image.ref.name"] for m in _index(tmp_path)]
    assert sorted(names) == ["r/a:1", "r/a:2"]

    stale = tmp_path / "blobs/sha256" / ".tmp-x.999999999.abcd"
    stale.write_bytes(b"stale")
    # What gc frees is the blocks the files held, not the bytes in them.
    allocated = sum(p.stat().st_blocks * 512 for p in (stale, store.path(drop.digest)))
    result = store.gc({keep.digest})
    assert result.blobs_removed == 1
    assert result.bytes_freed == allocated > 0
    assert store.has(keep.digest) and not store.has(drop.digest)
    assert all(m["digest"] == str(keep.digest) for m in _index(tmp_path))


def _index(root: Path) -> list[dict[str, object]]:
    manifests: list[dict[str, object]] = json.loads((root / "index.json").read_text())["manifests"]
    return manifests


@pytest.mark.parametrize("link", ["cache", "cache/blobs", "cache/blobs/sha256"])
def test_a_symlinked_cache_directory_is_refused(tmp_path: Path, link: str) -> None:
    # gc deletes inside blobs/sha256: through a link it would delete someone else's files.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text("not a blob")
    (elsewhere / ("ab" * 32)).write_text("named like one, but not in the data dir")
    data = tmp_path / "data"
    (data / link).parent.mkdir(parents=True, exist_ok=True)
    (data / link).symlink_to(elsewhere)
    with pytest.raises(StorageError, match=r"is a symlink.*replace it with a directory"):
        BlobStore(data / "cache")
    assert sorted(p.name for p in elsewhere.iterdir()) == sorted(["notes.txt", "ab" * 32])


def test_gc_deletes_only_regular_files_named_by_their_digest(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    unneeded = descriptor(b"unneeded")
    store.put(unneeded, b"unneeded")
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    blobs = tmp_path / "blobs" / "sha256"
    strangers = {
        "notes.txt": "a file a person left",
        "AB" * 32: "upper-case hex is not a digest name",
        "a" * 63: "too short",
    }
    for name, text in strangers.items():
        (blobs / name).write_text(text)
    (blobs / ("c" * 64)).symlink_to(outside / "precious")  # digest-shaped, but a link
    (blobs / ("d" * 64)).mkdir()  # digest-shaped, but a directory
    (tmp_path / "blobs" / "sha512").symlink_to(outside)  # an algorithm dir that is a link
    assert list(store.digests()) == [unneeded.digest]
    result = store.gc(set())
    assert result.blobs_removed == 1 and not store.has(unneeded.digest)
    left = sorted(p.name for p in blobs.iterdir())
    assert left == sorted([*strangers, "c" * 64, "d" * 64])
    assert (outside / "precious").read_text() == "keep"
