"""The image store: atomic records, tag links swapped by rename, deletes by tag or digest."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import pytest

from hypeman_images.errors import InvalidReference, NotFound, StorageError
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.reference import parse_reference
from hypeman_images.store.images import ImageRecord, ImageStatus, ImageStore, now, read_record

D1 = Digest("sha256", "1" * 64)
D2 = Digest("sha256", "2" * 64)


def ready(store: ImageStore, name: str, digest: Digest) -> None:
    ref = parse_reference(name)
    record = ImageRecord(name=name, digest=str(digest), status=ImageStatus.READY, created_at=now())
    store.write(ref, digest, record)
    (store.digest_dir(ref, digest) / "rootfs.ext4").write_bytes(b"disk")
    store.set_tag(ref, digest)


def test_layout_on_disk(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    ready(store, "127.0.0.1:5000/library/alpine:3.20", D1)
    repo = tmp_path / "127.0.0.1:5000/library/alpine"
    assert (repo / D1.encoded / "metadata.json").is_file()
    assert (repo / D1.encoded / "rootfs.ext4").is_file()
    assert os.readlink(repo / "3.20") == D1.encoded
    found = store.find(parse_reference("127.0.0.1:5000/library/alpine:3.20"))
    assert found.record.status is ImageStatus.READY
    assert found.tags == ("3.20",)
    by_digest = store.find(parse_reference(f"127.0.0.1:5000/library/alpine@{D1}"))
    assert by_digest.directory == found.directory


def test_tag_moves_by_rename(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    ready(store, "r.io/a:latest", D1)
    ready(store, "r.io/a:latest", D2)
    assert store.tag_target(parse_reference("r.io/a:latest")) == D2
    leftovers = [p for p in (tmp_path / "r.io/a").iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == []


def test_remove_by_tag_keeps_disk_while_another_tag_points_at_it(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    ready(store, "r.io/a:1", D1)
    ready(store, "r.io/a:2", D1)
    assert store.remove(parse_reference("r.io/a:1")) == ["r.io/a:1"]
    assert (tmp_path / "r.io/a" / D1.encoded / "rootfs.ext4").exists()
    removed = store.remove(parse_reference("r.io/a:2"))
    assert removed == ["r.io/a:2", f"r.io/a@{D1}"]
    assert not (tmp_path / "r.io/a" / D1.encoded).exists()


def test_remove_by_digest_removes_all_tags(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    ready(store, "r.io/a:1", D1)
    ready(store, "r.io/a:2", D1)
    store.remove(parse_reference(f"r.io/a@{D1}"))
    assert sorted(p.name for p in (tmp_path / "r.io/a").iterdir()) == []


def test_unknown_image(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="pull it first"):
        ImageStore(tmp_path).find(parse_reference("r.io/nothing:here"))


def test_digest_shaped_tag_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidReference, match="looks like a digest"):
        ImageStore(tmp_path).set_tag(parse_reference("r.io/a:" + "a" * 64), D1)


def test_scan_finds_records_without_tags_and_sweep_cleans(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    ref = parse_reference("r.io/a:1")
    store.write(ref, D1, ImageRecord("r.io/a:1", str(D1), ImageStatus.CONVERTING, now()))
    stale = store.digest_dir(ref, D1) / ".tmp-rootfs.ext4.999999999.0000"
    stale.write_bytes(b"x" * 10)
    [found] = list(store.scan())
    assert found.record.status is ImageStatus.CONVERTING and found.tags == ()
    allocated = stale.stat().st_blocks * 512  # the space freed: blocks, not bytes written
    assert store.sweep() == allocated > 0
    assert not stale.exists()


def test_record_round_trip() -> None:
    record = ImageRecord(
        "r.io/a:1", str(D1), ImageStatus.READY, now(), env=["A=1", "B=2"], cmd=["sh"]
    )
    assert ImageRecord.from_json(record.to_json()) == record


def test_nested_repository_cannot_hide_inside_a_tag(tmp_path: Path) -> None:
    # ``r.io/a:b``'s tag link sits where repository ``r.io/a/b`` would live.
    store = ImageStore(tmp_path)
    ready(store, "r.io/a:b", D1)
    with pytest.raises(InvalidReference, match="collides with the local tag 'b'"):
        store.digest_dir(parse_reference("r.io/a/b:latest"), D2)
    assert store.find(parse_reference("r.io/a:b")).record.status is ImageStatus.READY


def test_tag_cannot_shadow_a_nested_repository(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    ready(store, "r.io/a/b:latest", D1)
    with pytest.raises(InvalidReference, match="collides with the local repository"):
        store.validate(parse_reference("r.io/a:b"))
    assert store.find(parse_reference("r.io/a/b:latest")).record.status is ImageStatus.READY


def test_digest_shaped_repository_component_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidReference, match="64-hex-digit"):
        ImageStore(tmp_path).repo_dir(parse_reference("r.io/" + "c" * 64 + "/x"))


def test_scan_survives_directories_vanishing_mid_walk(tmp_path: Path) -> None:
    import threading

    store = ImageStore(tmp_path)
    ready(store, "r.io/a:1", D1)
    stop = threading.Event()

    def churn() -> None:
        n = 0
        while not stop.is_set():
            doomed = tmp_path / "r.io" / f".deleting-x.{n}.1234"
            # sweep may take it first, or be halfway through it (ENOENT, ENOTEMPTY)
            with contextlib.suppress(OSError):
                (doomed / "deep" / "er").mkdir(parents=True)
                shutil.rmtree(doomed)
            n += 1

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        for _ in range(300):
            assert [s.record.digest for s in store.scan()] == [str(D1)]
            store.sweep()
    finally:
        stop.set()
        worker.join()


def test_lock_follows_a_directory_renamed_while_waiting(tmp_path: Path) -> None:
    import threading

    store = ImageStore(tmp_path)
    ref = parse_reference("r.io/a:1")
    inside = threading.Event()
    entered: list[bool] = []

    def second() -> None:
        with store.lock(ref, D1):
            entered.append((store.digest_dir(ref, D1) / ".lock").exists())

    with store.lock(ref, D1):
        waiter = threading.Thread(target=second)
        waiter.start()
        inside.wait(0.2)
        store.remove_directory(store.digest_dir(ref, D1))
    waiter.join(5)
    assert entered == [True], "the waiter must hold the lock of the directory that exists"


def test_a_writer_with_a_stale_copy_keeps_the_pending_tags_others_added(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    ref = parse_reference("127.0.0.1:5000/app:1")
    build = ImageRecord(name=str(ref), digest=str(D1), status=ImageStatus.PULLING, created_at=now())
    store.write(ref, D1, build)
    also = "127.0.0.1:5000/app:latest"
    added = store.update(ref, D1, lambda r: r.evolve(pending_tags=[*r.pending_tags, also]))
    assert added is not None and added.pending_tags == [also]
    # The build's own copy never saw the new tag; writing it must not drop it.
    store.write(ref, D1, build.evolve(status=ImageStatus.CONVERTING))
    record = store.read(ref, D1)
    assert record is not None and record.status is ImageStatus.CONVERTING
    assert record.pending_tags == [also]
    # A fresh request starts a new round: nothing carried over.
    store.write(ref, D1, build.evolve(status=ImageStatus.PENDING), keep_pending=False)
    assert store.read(ref, D1).pending_tags == []  # type: ignore[union-attr]
    assert store.update(parse_reference("127.0.0.1:5000/app:1"), D2, lambda r: r) is None


def test_an_old_record_with_a_tags_list_reads_as_local_names_not_labels(tmp_path: Path) -> None:
    """metadata.json of before user labels had ``tags``: a list of local tag names.

    hypeman's ``tags`` are labels (a map); an old list means the tag links, which
    the store reads from the links themselves, so the record is used as it is.
    """
    store = ImageStore(tmp_path)
    ready(store, "r.io/a:3.20", D1)
    metadata = tmp_path / "r.io/a" / D1.encoded / "metadata.json"
    old = {k: v for k, v in json.loads(metadata.read_text()).items() if k != "borrowed_credentials"}
    old["tags"] = ["3.20"]
    metadata.write_text(json.dumps(old))
    before = metadata.read_bytes()

    found = store.find(parse_reference("r.io/a:3.20"))
    assert found.record.tags == {} and found.tags == ("3.20",)
    assert [s.record.tags for s in store.scan()] == [{}]
    assert metadata.read_bytes() == before  # read, not rewritten

    # The next write is in the new form: labels as a map.
    store.update(parse_reference("r.io/a:3.20"), D1, lambda r: r.evolve(tags={"team": "a"}))
    assert json.loads(metadata.read_text())["tags"] == {"team": "a"}


def test_a_build_writing_its_record_keeps_labels_a_request_set_meanwhile(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    ref = parse_reference("r.io/a:1")
    first = ImageRecord(name=str(ref), digest=str(D1), status=ImageStatus.PULLING, created_at=now())
    store.write(ref, D1, first)
    store.update(ref, D1, lambda r: r.evolve(tags={"env": "ci"}))
    written = store.write(ref, D1, first.evolve(status=ImageStatus.CONVERTING))
    assert written.tags == {"env": "ci"} == store.find(parse_reference(f"r.io/a@{D1}")).record.tags
    assert written.status is ImageStatus.CONVERTING


@pytest.mark.parametrize(
    "doc",
    [
        pytest.param(b"[]", id="not-an-object"),
        pytest.param(b'{"name": "x", "digest": "y", "created_at": "z"}', id="no-status"),
        pytest.param(
            b'{"name": "x", "digest": "y", "status": "bogus", "created_at": "z"}', id="bad-status"
        ),
        pytest.param(
            b'{"name": "x", "digest": "y", "status": "ready", "created_at": null}', id="null-time"
        ),
        pytest.param(
            b'{"name": "x", "digest": "y", "status": "ready", "created_at": "z", '
            b'"size_bytes": true}',
            id="bool-for-int",
        ),
        pytest.param(
            b'{"name": "x", "digest": "y", "status": "ready", "created_at": "z", '
            b'"labels": {"a": 1}}',
            id="dict-value",
        ),
    ],
)
def test_corrupt_records_are_refused_whole(tmp_path: Path, doc: bytes) -> None:
    # Refused when read, so no reader meets a field of the wrong type later.
    with pytest.raises((ValueError, KeyError, TypeError)):
        ImageRecord.from_json(doc)
    (tmp_path / "metadata.json").write_bytes(doc)
    assert read_record(tmp_path) is None


def test_a_symlinked_store_directory_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    data = tmp_path / "data"
    data.mkdir()
    (data / "images").symlink_to(elsewhere)
    with pytest.raises(StorageError, match="is a symlink"):
        ImageStore(data / "images")


@pytest.mark.parametrize(
    "link", ["r.io", "r.io/team", "r.io/team/app", f"r.io/team/app/{D1.encoded}"]
)
def test_a_symlinked_registry_or_repository_is_refused(tmp_path: Path, link: str) -> None:
    # Disks are written under images/<registry>/<repository>/<digest>: a link on the
    # way would put them (and their deletion) outside the data dir.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    store = ImageStore(tmp_path / "images")
    (tmp_path / "images" / link).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "images" / link).symlink_to(elsewhere)
    ref = parse_reference("r.io/team/app:v1")
    with pytest.raises(StorageError, match="is a symlink"):
        ready(store, "r.io/team/app:v1", D1)
    if D1.encoded not in link:  # refused before any network call too
        with pytest.raises(StorageError, match="is a symlink"):
            store.validate(ref)
    assert list(elsewhere.iterdir()) == []
    assert list(store.scan()) == []
