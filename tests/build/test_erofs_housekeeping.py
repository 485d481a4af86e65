"""An EROFS disk beside an ext4 one under the store's housekeeping: writers, interrupted
builds, quarantined records, gc and recovery per format. (EROFS disks in the disk
cache: tests/build/test_diskcache_erofs.py.)

The build directories are made by hand (as in tests/build/test_manager.py), so
most of these need no registry.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from support.fleet import FAST

from hypeman_images.build.maintenance import recover_builds
from hypeman_images.build.manager import ImageManager
from hypeman_images.build.options import BuildOptions
from hypeman_images.build.queue import Job
from hypeman_images.fsutil import process_id
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.reference import parse_reference
from hypeman_images.registry.client import RegistryClient
from hypeman_images.store.blobs import BlobStore
from hypeman_images.store.formats import DiskFormat
from hypeman_images.store.housekeeping import INTERRUPTED
from hypeman_images.store.images import ImageRecord, ImageStatus, ImageStore, now, read_records

DEAD = "999999999"  # no such pid: a writer that is gone
NAME = "127.0.0.1:1/two/formats"
HEX = "c" * 64
EROFS = DiskFormat.EROFS


def fast_client() -> RegistryClient:
    return RegistryClient(config=FAST)


def record_of(status: ImageStatus, fmt: DiskFormat, writer: str | None = None) -> ImageRecord:
    return ImageRecord(
        name=f"{NAME}:v1",
        digest=f"sha256:{HEX}",
        status=status,
        created_at=now(),
        format=fmt,
        writer=writer,
    )


def build_dir(data_dir: Path, erofs: ImageStatus, writer: str | None = None) -> Path:
    """A digest with a ready ext4 disk (tagged ``v1``) and an EROFS record of ``erofs``."""
    directory = data_dir / "images" / NAME / HEX
    directory.mkdir(parents=True)
    (directory / ".lock").touch()
    (directory / "metadata.json").write_bytes(
        record_of(ImageStatus.READY, DiskFormat.EXT4).to_json()
    )
    (directory / "rootfs.ext4").write_bytes(b"\0" * 4096)
    (directory / "metadata.erofs.json").write_bytes(record_of(erofs, EROFS, writer).to_json())
    if erofs is ImageStatus.READY:
        (directory / "rootfs.erofs").write_bytes(b"\0" * 4096)
    (directory.parent / "v1").symlink_to(HEX)
    return directory


def test_an_erofs_record_says_which_live_process_wrote_it(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    ref, digest = parse_reference(f"{NAME}:v1"), Digest("sha256", HEX)
    store.write(ref, digest, record_of(ImageStatus.PULLING, EROFS))
    written = store.read(ref, digest, EROFS)
    assert written is not None and written.writer == process_id()
    assert store.read(ref, digest) is None  # the ext4 record is another file
    store.update(ref, digest, lambda r: r.evolve(status=ImageStatus.READY), EROFS)
    done = store.read(ref, digest, EROFS)
    assert done is not None and done.writer is None and done.format is EROFS


def test_an_interrupted_erofs_build_shows_failed_and_gc_drops_only_it(data_dir: Path) -> None:
    directory = build_dir(data_dir, ImageStatus.CONVERTING, writer=f"{DEAD}:1")
    with open(directory / f".tmp-rootfs.erofs.{DEAD}.abcd", "wb") as disk:
        disk.write(b"\1" * 8192)
    with ImageManager(data_dir) as manager:
        shown = {image.format: image for image in manager.list()}
        assert shown[DiskFormat.EXT4].status is ImageStatus.READY
        assert (shown[EROFS].status, shown[EROFS].error) == (ImageStatus.FAILED, INTERRUPTED)
        interrupted = manager.get(f"{NAME}:v1", format=EROFS)
        assert interrupted.status is ImageStatus.FAILED
        assert manager.get(f"{NAME}:v1").format is DiskFormat.EXT4  # the ready one
        # The record on disk is left as it was, for serve's recovery to resume.
        assert json.loads((directory / "metadata.erofs.json").read_text())["status"] == (
            "converting"
        )

        report = manager.gc()
        assert report.directories_removed == 0 and report.bytes_freed >= 8192
        assert sorted(os.listdir(directory)) == [".lock", "metadata.json", "rootfs.ext4"]
        assert [image.format for image in manager.list()] == [DiskFormat.EXT4]


def test_an_erofs_build_of_a_live_process_is_left_to_it(data_dir: Path) -> None:
    directory = build_dir(data_dir, ImageStatus.PENDING, writer=process_id())
    with ImageManager(data_dir) as manager:
        assert manager.get(f"{NAME}:v1", format=EROFS).status is ImageStatus.PENDING
        manager.gc()
    assert "metadata.erofs.json" in os.listdir(directory)


def test_an_unreadable_erofs_record_is_quarantined_and_the_ext4_disk_stays(
    data_dir: Path,
) -> None:
    directory = build_dir(data_dir, ImageStatus.READY)
    (directory / "metadata.erofs.json").write_bytes(b"{")
    with ImageManager(data_dir) as manager:
        report = manager.recover()
        assert report.resumed == ()
        assert [(i.format, i.status) for i in manager.list()] == [
            (DiskFormat.EXT4, ImageStatus.READY)
        ]
    assert sorted(os.listdir(directory)) == [".lock", "metadata.json", "rootfs.ext4"]
    quarantined = sorted(p.name for p in (data_dir / "quarantine").iterdir())
    assert sorted(q.rsplit("_", 1)[-1] for q in quarantined) == [
        "metadata.erofs.json",
        "rootfs.erofs",
    ]
    assert all(f"{HEX}_" in q for q in quarantined)

    # Both records unreadable: the whole directory goes, as an ext4-only one does.
    (directory / "metadata.json").write_bytes(b"[]")
    (directory / "metadata.erofs.json").write_bytes(b"{")
    with ImageManager(data_dir) as manager:
        manager.recover()
        assert manager.list() == []
    assert not directory.exists()
    assert sum(q.name.endswith(HEX) for q in (data_dir / "quarantine").iterdir()) == 1


def test_recovery_resumes_an_erofs_build_as_erofs(data_dir: Path) -> None:
    directory = build_dir(data_dir, ImageStatus.PULLING, writer=f"{DEAD}:1")
    store = ImageStore(data_dir / "images")
    jobs: list[Job] = []
    report = recover_builds(store, BlobStore(data_dir / "cache"), BuildOptions(), jobs.append)
    assert report.resumed == (f"{NAME}:v1",)
    [job] = jobs
    assert (job.key.format, job.options.format) == (EROFS, EROFS)
    records = {r.format: r for r in read_records(directory)}
    assert records[EROFS].writer == process_id()  # ours now
    assert records[DiskFormat.EXT4].status is ImageStatus.READY
