"""ImageManager against the real test registry: create/get/list/delete/gc and the queue.

Builds are real (pull, flatten, mke2fs). ``builder`` — the manager's seam for
the pipeline — is wrapped where a test must observe or hold builds.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from support.deep import make_deep_tree
from support.disk import e2fsck_clean
from support.images import make_image, make_layer, push_image, push_manifest
from support.pushed import PushedImage
from support.registry import RegistryServer
from support.service import push_small_images
from support.tar import file

from hypeman_images import Image, ImageManager, ImageStatus
from hypeman_images.build.metrics import parse
from hypeman_images.build.pipeline import BuildStats, build_resolved
from hypeman_images.build.progress import PlainReporter
from hypeman_images.errors import Conflict, InvalidReference, NotFound
from hypeman_images.fsutil import process_alive, process_id
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.reference import parse_reference
from hypeman_images.store.images import ImageRecord, ImageStore, StoredImage, now


class Observed:
    """Wraps the pipeline: counts builds, tracks how many run at once, can hold them."""

    def __init__(self, hold: bool = False) -> None:
        self.lock = threading.Lock()
        self.builds = 0
        self.running = 0
        self.peak = 0
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()

    def __call__(self, resolved: Any, **kwargs: Any) -> StoredImage:
        with self.lock:
            self.builds += 1
            self.running += 1
            self.peak = max(self.peak, self.running)
        self.started.set()
        try:
            assert self.release.wait(30)
            return build_resolved(resolved, **kwargs)
        finally:
            with self.lock:
                self.running -= 1


@pytest.fixture
def observed() -> Observed:
    return Observed()


@pytest.fixture
def manager(data_dir: Path, observed: Observed) -> Iterator[ImageManager]:
    with ImageManager(data_dir, builder=observed) as m:
        yield m


@pytest.fixture(scope="module")
def small_refs(registry: RegistryServer) -> list[str]:
    return push_small_images(registry, "mgr", 5)


@pytest.fixture(scope="module")
def broken_ref(registry: RegistryServer) -> str:
    """An image whose config's diff_id does not match its layer: every build fails."""
    layer = make_layer([file("x", b"x")])
    image = make_image(
        [layer], config_extra={"rootfs": {"type": "layers", "diff_ids": ["sha256:" + "0" * 64]}}
    )
    push_image(registry.url, "test/broken", "v1", image)
    return f"{registry.host}/test/broken:v1"


@pytest.fixture(scope="module")
def alpine_copy(alpine_ref: PushedImage) -> str:
    """A second tag for alpine's manifest: same digest, another name."""
    image = alpine_ref.image
    push_manifest(
        alpine_ref.registry.url, "library/alpine", "copy", image.manifest, image.manifest_media_type
    )
    return f"{alpine_ref.registry.host}/library/alpine:copy"


def test_create_returns_at_once_then_builds(manager: ImageManager, alpine_ref: PushedImage) -> None:
    image = manager.create(alpine_ref.ref)
    assert image.status in (ImageStatus.PENDING, ImageStatus.PULLING, ImageStatus.CONVERTING)
    assert image.digest == alpine_ref.manifest_digest
    assert image.name == alpine_ref.ref
    done = manager.wait(alpine_ref.ref, timeout=60)
    assert done.status is ImageStatus.READY, done.error
    assert done.size_bytes and done.disk is not None
    assert done.size_bytes == done.disk.stat().st_size
    assert done.cmd == ["/bin/sh"] and done.entrypoint is None
    assert done.env["PATH"].startswith("/usr/local/sbin")
    assert done.local_names == ("3.20.3",)
    e2fsck_clean(done.disk)
    assert manager.get(alpine_ref.digest_ref).disk == done.disk
    [listed] = manager.list()
    assert listed.size_bytes == done.size_bytes and listed.status is ImageStatus.READY


def test_ready_image_is_reused_without_a_build(
    manager: ImageManager, observed: Observed, alpine_ref: PushedImage
) -> None:
    manager.pull(alpine_ref.ref)
    again = manager.create(alpine_ref.ref)
    assert again.status is ImageStatus.READY and again.queue_position is None
    stats = BuildStats()
    manager.pull(alpine_ref.digest_ref, stats=stats)
    assert stats.reused
    assert observed.builds == 1
    assert 'hypeman_images_cache_hits_total{kind="image"} 2' in manager.metrics.render(
        manager.gauges()
    )


def test_one_build_per_digest_sets_every_tag(
    data_dir: Path, alpine_ref: PushedImage, alpine_copy: str
) -> None:
    observed = Observed(hold=True)
    with ImageManager(data_dir, builder=observed) as manager:
        names = [alpine_ref.ref, alpine_copy, alpine_ref.digest_ref] * 4
        with ThreadPoolExecutor(len(names)) as pool:
            images = list(pool.map(manager.create, names))
        assert {i.digest for i in images} == {alpine_ref.manifest_digest}
        assert {i.status for i in images} == {ImageStatus.PENDING}
        observed.release.set()
        ready = manager.wait(alpine_copy, timeout=60)
        assert ready.status is ImageStatus.READY
        assert observed.builds == 1
        assert manager.get(alpine_ref.ref).local_names == ("3.20.3", "copy")


def test_limit_of_two_with_five_images(data_dir: Path, small_refs: list[str]) -> None:
    observed = Observed(hold=True)
    with ImageManager(data_dir, builder=observed, concurrency=2) as manager:
        images = [manager.create(ref) for ref in small_refs]
        assert [i.status for i in images] == [ImageStatus.PENDING] * 5
        # Two run; three wait in order.
        assert [i.queue_position for i in images] == [None, None, 1, 2, 3]
        assert manager.gauges().queue_length == 3
        observed.release.set()
        for ref in small_refs:
            assert manager.wait(ref, timeout=60).status is ImageStatus.READY
    assert observed.builds == 5
    assert observed.peak == 2


def test_failed_build_reports_and_is_retried(manager: ImageManager, broken_ref: str) -> None:
    manager.create(broken_ref)
    failed = manager.wait(broken_ref, timeout=60)
    assert failed.status is ImageStatus.FAILED
    assert failed.error and "diff_id" in failed.error
    # Still found by tag after the build ended, though no tag link points at it.
    assert manager.get(broken_ref).status is ImageStatus.FAILED
    retried = manager.create(broken_ref)
    assert retried.status is not ImageStatus.FAILED
    assert manager.wait(broken_ref, timeout=60).status is ImageStatus.FAILED
    assert manager.metrics.builds("failure") == 2


def test_pull_reports_progress_and_raises_the_build_error(
    manager: ImageManager, busybox_ref: PushedImage, broken_ref: str
) -> None:
    out = io.StringIO()
    stored = manager.pull(busybox_ref.ref, reporter=PlainReporter(out))
    assert stored.disk.is_file()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("resolving:")
    assert any(line.startswith("layer ") for line in lines), lines
    assert any(line.startswith("converting") for line in lines)
    with pytest.raises(Exception, match="diff_id"):
        manager.pull(broken_ref)


def test_delete_keeps_the_disk_while_another_tag_points_at_it(
    manager: ImageManager, alpine_ref: PushedImage, alpine_copy: str
) -> None:
    manager.pull(alpine_ref.ref)
    disk = manager.pull(alpine_copy).disk
    assert manager.delete(alpine_ref.ref) == [alpine_ref.ref]
    assert disk.is_file()
    assert manager.get(alpine_copy).local_names == ("copy",)
    with pytest.raises(NotFound):
        manager.get(alpine_ref.ref)
    removed = manager.delete(alpine_copy)
    assert removed == [alpine_copy, alpine_ref.digest_ref]
    assert not disk.parent.exists()
    assert manager.list() == []


def test_delete_by_digest_removes_all_tags(
    manager: ImageManager, alpine_ref: PushedImage, alpine_copy: str
) -> None:
    manager.pull(alpine_ref.ref)
    manager.pull(alpine_copy)
    removed = manager.delete(alpine_ref.digest_ref)
    assert sorted(removed) == sorted([alpine_ref.ref, alpine_copy, alpine_ref.digest_ref])
    assert manager.list() == []


def test_delete_while_building_is_a_conflict(data_dir: Path, alpine_ref: PushedImage) -> None:
    observed = Observed(hold=True)
    with ImageManager(data_dir, builder=observed) as manager:
        manager.create(alpine_ref.ref)
        assert observed.started.wait(10)
        for name in (alpine_ref.ref, alpine_ref.digest_ref):
            with pytest.raises(Conflict, match="being built"):
                manager.delete(name)
        observed.release.set()
        assert manager.wait(alpine_ref.ref, timeout=60).status is ImageStatus.READY
        manager.delete(alpine_ref.ref)


def test_unknown_and_invalid_names(manager: ImageManager, alpine_ref: PushedImage) -> None:
    host = alpine_ref.registry.host
    with pytest.raises(NotFound):
        manager.create(f"{host}/library/alpine:no-such-tag")
    with pytest.raises(NotFound):
        manager.get(f"{host}/library/alpine:never-pulled")
    with pytest.raises(NotFound):
        manager.delete(f"{host}/library/alpine:never-pulled")
    for bad in ("../../etc", "UPPER", "a/../b", ""):
        with pytest.raises(InvalidReference):
            manager.get(bad)


def test_gc_removes_failed_builds_and_unneeded_blobs(
    manager: ImageManager, alpine_ref: PushedImage, broken_ref: str
) -> None:
    manager.pull(alpine_ref.ref)
    manager.create(broken_ref)
    assert manager.wait(broken_ref, timeout=60).status is ImageStatus.FAILED
    blobs_before = set(manager.blobs.digests())
    report = manager.gc()
    assert report.directories_removed == 1
    assert report.blobs_removed >= 1 and report.bytes_freed > 0
    [left] = manager.list()
    assert left.status is ImageStatus.READY
    needed = {left.record.digest, left.record.config_digest, *left.record.layers}
    assert {str(d) for d in manager.blobs.digests()} == needed
    assert {str(d) for d in blobs_before} > needed
    # A second gc finds nothing more.
    assert manager.gc() == type(report)(0, 0, 0)


def test_gc_removes_an_orphaned_build_dir_and_counts_it(
    manager: ImageManager, busybox_ref: PushedImage
) -> None:
    ready = manager.pull(busybox_ref.ref)
    # A build dir with no metadata.json (a build that died before its first record,
    # or a record lost by hand): nothing can resume it, so gc takes it whole.
    orphan = ready.directory.parent.parent / "orphan" / ("ab" * 32)
    orphan.mkdir(parents=True)
    (orphan / ".lock").touch()
    (orphan / "rootfs.ext4").write_bytes(b"x" * (1 << 20))
    report = manager.gc()
    assert not orphan.exists()
    assert report.directories_removed == 1
    assert report.bytes_freed >= 1 << 20
    assert report.blobs_removed == 0  # busybox's blobs stay
    [left] = manager.list()
    assert left.status is ImageStatus.READY and left.disk == ready.disk
    e2fsck_clean(ready.disk)


def test_gc_during_a_build_keeps_its_blobs_and_the_build_finishes(
    data_dir: Path, alpine_ref: PushedImage
) -> None:
    observed = Observed()
    with ImageManager(data_dir, builder=observed) as manager:
        manager.pull(alpine_ref.ref)
        manager.delete(alpine_ref.ref)  # its blobs are now cached but unreferenced
        cached = set(manager.blobs.digests())
        assert {str(d) for d in cached} >= {alpine_ref.image.config_digest}
        observed.started.clear()
        observed.release.clear()  # hold the next build
        manager.create(alpine_ref.ref)
        assert observed.started.wait(10)  # the build is running, held before its pipeline
        report = manager.gc()
        assert report.blobs_removed == 0
        assert set(manager.blobs.digests()) == cached
        pulled_before = parse(manager.metrics.render(manager.gauges()))
        observed.release.set()
        done = manager.wait(alpine_ref.ref, timeout=60)
        assert done.status is ImageStatus.READY, done.error
        assert done.disk is not None
        e2fsck_clean(done.disk)
        pulled = parse(manager.metrics.render(manager.gauges()))
        # Every blob came from the cache gc kept: nothing was downloaded again.
        key = "hypeman_images_pulled_bytes_total"
        assert pulled[key] == pulled_before[key]
    assert observed.builds == 2


def test_recover_resumes_an_interrupted_build_and_restores_the_tag(
    data_dir: Path, alpine_ref: PushedImage, busybox_ref: PushedImage
) -> None:
    with ImageManager(data_dir) as manager:
        alpine = manager.pull(alpine_ref.ref)
        busybox = manager.pull(busybox_ref.ref)
    # A crash after the disk was renamed into place but before "ready": the
    # record still says converting, the tag link is not there, mke2fs's temp remains.
    record = alpine.record.evolve(status=ImageStatus.CONVERTING)
    (alpine.directory / "metadata.json").write_bytes(record.to_json())
    (alpine.directory.parent / "3.20.3").unlink()
    (alpine.directory / ".rootfs.ext4.abc123.tmp").write_bytes(b"\0" * 4096)
    # A crash between "ready" and the tag link.
    (busybox.directory.parent / "1.38.0-glibc").unlink()

    with ImageManager(data_dir) as manager:
        report = manager.recover()
        assert report.resumed == (alpine_ref.ref,)
        assert report.retagged == (busybox_ref.ref,)
        assert report.bytes_freed >= 4096
        assert manager.get(busybox_ref.ref).status is ImageStatus.READY
        ready = manager.wait(alpine_ref.ref, timeout=60)
        assert ready.status is ImageStatus.READY and ready.local_names == ("3.20.3",)
        assert ready.disk is not None
        e2fsck_clean(ready.disk)
    assert sorted(os.listdir(alpine.directory)) == [".lock", "metadata.json", "rootfs.ext4"]


def test_image_json_shape(manager: ImageManager, busybox_ref: PushedImage) -> None:
    manager.pull(busybox_ref.ref)
    doc = manager.get(busybox_ref.ref).to_json()
    assert set(doc) == {
        "name", "digest", "status", "queue_position", "error", "size_bytes", "entrypoint",
        "cmd", "env", "working_dir", "user", "created_at", "tags", "platform", "local_names",
        "format", "source",
    }  # fmt: skip
    assert doc["source"] == {"kind": "build", "repository": None, "artifact": None}
    assert isinstance(manager.get(busybox_ref.ref), Image)


def test_a_slow_old_build_does_not_move_the_tag_back(
    registry: RegistryServer, data_dir: Path
) -> None:
    """The tag moves upstream while its old digest builds: the newest request wins."""
    old = make_image([make_layer([file("v", b"old\n")])])
    new = make_image([make_layer([file("v", b"new\n")])])
    gate = threading.Event()

    def builder(resolved: Any, **kwargs: Any) -> StoredImage:
        if str(resolved.digest) == old.manifest_digest:
            assert gate.wait(30)  # the old digest finishes last
        return build_resolved(resolved, **kwargs)

    name = f"{registry.host}/moving/tag:latest"
    with ImageManager(data_dir, concurrency=2, builder=builder) as manager:
        push_image(registry.url, "moving/tag", "latest", old)
        manager.create(name)
        push_image(registry.url, "moving/tag", "latest", new)
        manager.create(name)
        assert manager.wait(f"{registry.host}/moving/tag@{new.manifest_digest}", 60).status == (
            ImageStatus.READY
        )
        gate.set()
        done = manager.wait(f"{registry.host}/moving/tag@{old.manifest_digest}", 60)
        assert done.status is ImageStatus.READY
        assert manager.get(name).digest == new.manifest_digest


# -- leftovers and bad records never stop recover, gc or rm ----------------------

DEAD = "999999999"  # no such pid: a writer that is gone
DEEP = 2000  # past Python's recursion limit and PATH_MAX as a path ("dir/" * 2000)


def stored_build(data_dir: Path, status: ImageStatus, hexd: str, tag: str | None = None) -> Path:
    """A build directory as the pipeline leaves it, made by hand: no registry needed."""
    directory = data_dir / "images" / "127.0.0.1:1" / "deep" / "image" / hexd
    directory.mkdir(parents=True)
    record = ImageRecord(
        name=f"127.0.0.1:1/deep/image:{tag or 'x'}",
        digest=f"sha256:{hexd}",
        status=status,
        created_at=now(),
    )
    (directory / "metadata.json").write_bytes(record.to_json())
    (directory / ".lock").touch()
    if status is ImageStatus.READY:
        (directory / "rootfs.ext4").write_bytes(b"\0" * 4096)
    if tag is not None:
        (directory.parent / tag).symlink_to(hexd)
    return directory


def test_deep_staging_leftovers_do_not_stop_recover_gc_or_rm(data_dir: Path) -> None:
    # What a fallback build of a deep image left when its process died: the staged
    # tree, in the build dir, and a half-deleted build dir beside it.
    ready = stored_build(data_dir, ImageStatus.READY, "a" * 64, tag="v1")
    failed = stored_build(data_dir, ImageStatus.FAILED, "b" * 64)
    make_deep_tree(ready / f".tmp-staging.{DEAD}.abcd", DEEP)
    make_deep_tree(ready.parent / f".deleting-.tmp-{'c' * 64}.{DEAD}.abcd", DEEP)
    with ImageManager(data_dir) as manager:
        report = manager.recover()
        assert report.bytes_freed > 0
        assert sorted(os.listdir(ready)) == [".lock", "metadata.json", "rootfs.ext4"]
        assert sorted(os.listdir(ready.parent)) == sorted(["a" * 64, "b" * 64, "v1"])

        make_deep_tree(failed / f".tmp-staging.{DEAD}.abcd", DEEP)
        make_deep_tree(ready / f".tmp-staging.{DEAD}.efgh", DEEP)
        assert manager.gc().directories_removed == 1
        assert not failed.exists()
        assert sorted(os.listdir(ready)) == [".lock", "metadata.json", "rootfs.ext4"]

        make_deep_tree(ready / f".tmp-staging.{DEAD}.ijkl", DEEP)
        assert manager.delete("127.0.0.1:1/deep/image:v1")[-1].endswith("a" * 64)
        assert manager.list() == []
    assert not (data_dir / "quarantine").exists()


CORRUPT = {
    "not-json": b"{",
    "a-list": b"[]",
    "bad-status": b'{"name": "x", "digest": "y", "status": "bogus", "created_at": "z"}',
    "no-created-at": b'{"name": "x", "digest": "y", "status": "ready", "created_at": null}',
    "name-is-a-number": b'{"name": 5, "digest": "y", "status": "ready", "created_at": "z"}',
    "layers-is-a-string": (
        b'{"name": "x", "digest": "y", "status": "failed", "created_at": "z", "layers": "abc"}'
    ),
}


def test_corrupt_records_are_quarantined_and_recovery_goes_on(data_dir: Path) -> None:
    good = stored_build(data_dir, ImageStatus.READY, "a" * 64)
    corrupt = {}
    for n, (case, content) in enumerate(sorted(CORRUPT.items())):
        directory = stored_build(data_dir, ImageStatus.READY, f"{n + 1}" * 64)
        (directory / "metadata.json").write_bytes(content)
        corrupt[case] = directory
    # Its tag link is missing: recovery restores it, bad neighbours or not.
    good_record = json.loads((good / "metadata.json").read_text())
    (good / "metadata.json").write_bytes(
        json.dumps({**good_record, "name": "127.0.0.1:1/deep/image:v1"}).encode()
    )
    with ImageManager(data_dir) as manager:
        report = manager.recover()
        assert report.retagged == ("127.0.0.1:1/deep/image:v1",)
        assert [image.digest for image in manager.list()] == [f"sha256:{'a' * 64}"]
        assert manager.gc().directories_removed == 0
    assert all(not directory.exists() for directory in corrupt.values())
    # Each under "<time>.<random>.<registry>_<repository>_<digest hex>", for a person to read.
    quarantined = sorted(p.name for p in (data_dir / "quarantine").iterdir())
    assert sorted(q[-64:] for q in quarantined) == sorted(d.name for d in corrupt.values())
    assert all("127.0.0.1:1_deep_image_" in q for q in quarantined)
    assert (good.parent / "v1").is_symlink()


# -- a build whose process died shows as interrupted; gc and the next pull settle it --


def test_a_build_whose_process_died_shows_interrupted_and_gc_removes_it(data_dir: Path) -> None:
    # The record says converting, nobody holds its lock, its writer is gone: what
    # `kill -9` of a CLI pull leaves (tests/system/test_recovery.py does it for real).
    dead = stored_build(data_dir, ImageStatus.CONVERTING, "d" * 64)
    record = json.loads((dead / "metadata.json").read_text())
    (dead / "metadata.json").write_text(json.dumps({**record, "writer": f"{DEAD}:1"}))
    with open(dead / ".tmp-rootfs.ext4.999999999.abcd", "wb") as disk:
        disk.write(b"\1" * 8192)
        disk.truncate(1 << 30)  # mke2fs's sparse temp disk: 1 GiB long, 8 KiB allocated
    # A build queued in a live process (this one) and one another process is running.
    queued = stored_build(data_dir, ImageStatus.PENDING, "e" * 64)
    running = stored_build(data_dir, ImageStatus.PULLING, "f" * 64)
    queued_record = json.loads((queued / "metadata.json").read_text())
    (queued / "metadata.json").write_text(json.dumps({**queued_record, "writer": process_id()}))
    with open(running / ".lock", "a+b") as held, ImageManager(data_dir) as manager:
        fcntl.flock(held, fcntl.LOCK_EX)  # another open file: as another process's lock
        shown = {image.digest[7:8]: image for image in manager.list()}
        assert shown["d"].status is ImageStatus.FAILED
        assert shown["d"].error is not None and shown["d"].error.startswith("interrupted")
        assert manager.get(f"127.0.0.1:1/deep/image@sha256:{'d' * 64}").status == "failed"
        assert (shown["e"].status, shown["f"].status) == ("pending", "pulling")
        # The record on disk is left as it was, for serve's recovery to resume.
        assert json.loads((dead / "metadata.json").read_text())["status"] == "converting"

        report = manager.gc()
        assert report.directories_removed == 1 and not dead.exists()
        assert 8192 <= report.bytes_freed < 1 << 20  # the blocks freed, not the sparse size
        assert sorted(image.digest[7:8] for image in manager.list()) == ["e", "f"]


def test_a_record_says_which_live_process_wrote_it(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    ref = parse_reference("r.io/a:1")
    digest = Digest("sha256", "1" * 64)
    store.write(ref, digest, ImageRecord("r.io/a:1", str(digest), ImageStatus.PULLING, now()))
    written = store.read(ref, digest)
    assert written is not None and written.writer == process_id()
    assert process_alive(written.writer)
    assert not process_alive(f"{os.getpid()}:0")  # this pid, but another start: a reuse
    assert not process_alive(f"{DEAD}:1")
    done = store.update(ref, digest, lambda r: r.evolve(status=ImageStatus.READY))
    assert done is not None and store.read(ref, digest).writer is None  # type: ignore[union-attr]
