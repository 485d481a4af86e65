"""An ext4 and an EROFS disk of one digest side by side: records, list, inspect, verify, rm,
gc and recovery handle both; the REST API takes ``format`` as an extension field.

Layout (docs/design.md, "EROFS disks"): ``rootfs.ext4`` + ``metadata.json`` and
``rootfs.erofs`` + ``metadata.erofs.json`` in one digest directory, each record
with its own status and sha256; a record without ``format`` is ext4's.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from support.disk import compare_trees, e2fsck_clean, read_disk_tree
from support.erofs_check import fsck
from support.erofs_disk import read_erofs_tree
from support.pushed import PushedImage
from support.service import serve_in_thread, wait_for_status

from hypeman_images.build.manager import ImageManager
from hypeman_images.build.options import BuildOptions
from hypeman_images.store.formats import DiskFormat
from hypeman_images.store.images import ImageRecord, ImageStatus, read_records

CLI = str(Path(sys.executable).with_name("hypeman-images"))
EROFS = BuildOptions(format=DiskFormat.EROFS)


def cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command, *rest = args
    return subprocess.run(
        [CLI, command, "--data-dir", str(data_dir), *rest], capture_output=True, text=True
    )


def ok_json(data_dir: Path, *args: str) -> object:
    result = cli(data_dir, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_both_disks_of_one_digest(multilayer_ref: PushedImage, data_dir: Path) -> None:
    ref = multilayer_ref.ref
    ext4 = ok_json(data_dir, "pull", ref)
    erofs = ok_json(data_dir, "pull", "--format", "erofs", ref)
    assert isinstance(ext4, dict) and isinstance(erofs, dict)
    directory = Path(ext4["disk"]).parent
    assert Path(erofs["disk"]) == directory / "rootfs.erofs"
    names = {"rootfs.ext4", "metadata.json", "rootfs.erofs", "metadata.erofs.json", ".lock"}
    assert set(os.listdir(directory)) == names
    assert json.loads((directory / "metadata.json").read_text())["format"] == "ext4"
    for doc in (ext4, erofs):
        digest = hashlib.sha256(Path(doc["disk"]).read_bytes()).hexdigest()
        assert doc["disk_sha256"] == f"sha256:{digest}" and doc["status"] == "ready"
    assert ext4["disk_sha256"] != erofs["disk_sha256"]
    e2fsck_clean(ext4["disk"])
    fsck(Path(erofs["disk"]))
    assert compare_trees(read_disk_tree(ext4["disk"]), read_erofs_tree(erofs["disk"])) == []

    listed = ok_json(data_dir, "list")
    assert isinstance(listed, list)
    assert sorted((i["digest"], i["format"], i["disk"]) for i in listed) == sorted(
        (d["digest"], d["format"], d["disk"]) for d in (ext4, erofs)
    )
    table = cli(data_dir, "list").stdout.splitlines()
    assert table[0].split() == [
        *("REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE", "FORMAT", "STATUS")
    ]
    # FORMAT is shown because the two rows differ in it (cli/listing.py).
    column = table[0].index("FORMAT")
    assert sorted(line[column:].split()[0] for line in table[1:]) == ["erofs", "ext4"]
    shown = ok_json(data_dir, "inspect", "--format", "erofs", ref)
    assert isinstance(shown, dict) and shown["disk"] == erofs["disk"]
    assert "format:       ext4" in cli(data_dir, "inspect", ref).stdout  # ext4 first

    # Pulled again: each is ready, nothing is built.
    again = cli(data_dir, "pull", "--format", "erofs", ref)
    assert again.returncode == 0 and "already built" in again.stderr

    removed = ok_json(data_dir, "rm", ref)
    assert isinstance(removed, dict) and removed["removed"][-1].endswith(ext4["digest"])
    assert not directory.exists()


def test_verify_checks_each_disk_and_finds_a_corrupted_erofs(
    alpine_ref: PushedImage, data_dir: Path
) -> None:
    ref = alpine_ref.ref
    ok_json(data_dir, "pull", ref)
    erofs = ok_json(data_dir, "pull", "--format", "erofs", ref)
    assert isinstance(erofs, dict)
    checked = cli(data_dir, "verify", "--format", "erofs", ref)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith("ok: ") and "fsck.erofs clean" in checked.stdout
    doc = ok_json(data_dir, "verify", "--format", "erofs", ref)
    assert isinstance(doc, dict) and (doc["format"], doc["disk"]) == ("erofs", erofs["disk"])

    # A byte changed in a file's data: fsck.erofs cannot see it, the sha256 does.
    disk = Path(erofs["disk"])
    data = bytearray(disk.read_bytes())
    data[8192] ^= 0xFF
    disk.write_bytes(data)
    bad = cli(data_dir, "verify", "--format", "erofs", ref)
    assert bad.returncode == 12, bad.stderr
    assert "not to the sha256:" in bad.stderr
    # The ext4 disk of the same digest is untouched and still verifies.
    assert "e2fsck -fn clean" in cli(data_dir, "verify", ref).stdout


def test_fsck_erofs_finds_a_broken_superblock_without_a_recorded_sha256(
    alpine_ref: PushedImage, data_dir: Path
) -> None:
    erofs = ok_json(data_dir, "pull", "--format", "erofs", "--no-disk-digest", alpine_ref.ref)
    assert isinstance(erofs, dict) and erofs["disk_sha256"] is None
    disk = Path(erofs["disk"])
    data = bytearray(disk.read_bytes())
    data[1024 + 40] ^= 0xFF  # inside the superblock: its crc32c no longer matches
    disk.write_bytes(data)
    bad = cli(data_dir, "verify", "--format", "erofs", alpine_ref.ref)
    assert bad.returncode == 12, bad.stderr
    assert "fsck.erofs found problems" in bad.stderr


def _failed(record: ImageRecord, fmt: DiskFormat) -> ImageRecord:
    return record.evolve(format=fmt, status=ImageStatus.FAILED, error="it broke")


def test_gc_removes_a_failed_disk_and_keeps_the_other_format(
    alpine_ref: PushedImage, data_dir: Path
) -> None:
    with ImageManager(data_dir) as manager:
        ext4 = manager.pull(alpine_ref.ref)
        directory = ext4.directory
        (directory / "metadata.erofs.json").write_bytes(
            _failed(ext4.record, DiskFormat.EROFS).to_json()
        )
        (directory / "rootfs.erofs").write_bytes(b"half a disk")
        report = manager.gc()
        assert report.directories_removed == 0
        assert sorted(os.listdir(directory)) == [".lock", "metadata.json", "rootfs.ext4"]
        assert report.blobs_removed == 0  # the ext4 disk's blobs stay
        assert manager.get(alpine_ref.ref).status is ImageStatus.READY

        # The other way round: the failed ext4 record goes, the ready EROFS disk stays.
        erofs = manager.pull(alpine_ref.ref, options=EROFS)
        (directory / "metadata.json").write_bytes(_failed(ext4.record, DiskFormat.EXT4).to_json())
        manager.gc()
        left = sorted(os.listdir(directory))
        assert left == [".lock", "metadata.erofs.json", "rootfs.erofs"]
        assert manager.get(alpine_ref.ref).format is DiskFormat.EROFS
        fsck(erofs.disk)

        # Both failed: the directory goes.
        (directory / "metadata.erofs.json").write_bytes(
            _failed(erofs.record, DiskFormat.EROFS).to_json()
        )
        assert manager.gc().directories_removed == 1
        assert not directory.exists()


def test_recover_resumes_an_erofs_build_beside_a_ready_ext4(
    alpine_ref: PushedImage, data_dir: Path
) -> None:
    with ImageManager(data_dir) as manager:
        ext4 = manager.pull(alpine_ref.ref)
        erofs = manager.pull(alpine_ref.ref, options=EROFS)
    built = erofs.disk.read_bytes()
    ext4_bytes = ext4.disk.read_bytes()
    # A crash while the EROFS disk was being written: converting, a temp disk left.
    (erofs.directory / "metadata.erofs.json").write_bytes(
        erofs.record.evolve(status=ImageStatus.CONVERTING).to_json()
    )
    erofs.disk.unlink()
    (erofs.directory / ".rootfs.erofs.abc123.tmp").write_bytes(b"\0" * 4096)

    with ImageManager(data_dir) as manager:
        report = manager.recover()
        assert report.resumed == (alpine_ref.ref,) and report.bytes_freed >= 4096
        manager.wait(alpine_ref.ref, timeout=60)
        image = manager.get(alpine_ref.ref, format=DiskFormat.EROFS)
        assert image.status is ImageStatus.READY and image.disk == erofs.disk
    assert erofs.disk.read_bytes() == built  # the same bytes as the first build
    assert ext4.disk.read_bytes() == ext4_bytes
    formats = {r.format: r.status for r in read_records(erofs.directory)}
    assert formats == {DiskFormat.EXT4: ImageStatus.READY, DiskFormat.EROFS: ImageStatus.READY}


def test_a_record_written_before_erofs_reads_as_ext4(tmp_path: Path) -> None:
    old = {"name": "docker.io/library/a:1", "digest": "sha256:" + "a" * 64, "status": "ready"}
    record = ImageRecord.from_json(
        json.dumps({**old, "created_at": "2024-01-01T00:00:00Z"}).encode()
    )
    assert record.format is DiskFormat.EXT4
    assert json.loads(record.to_json())["format"] == "ext4"
    assert DiskFormat.EROFS.disk_name == "rootfs.erofs"
    assert DiskFormat.EROFS.metadata_name == "metadata.erofs.json"
    assert DiskFormat.EXT4.metadata_name == "metadata.json"


@pytest.fixture
def api(data_dir: Path) -> Iterator[tuple[str, ImageManager]]:
    with ImageManager(data_dir) as manager, serve_in_thread(manager) as base:
        yield base, manager


def test_rest_create_with_format(api: tuple[str, ImageManager], alpine_ref: PushedImage) -> None:
    base, _ = api
    name = quote(alpine_ref.ref, safe="")
    with httpx.Client(timeout=30) as client:
        response = client.post(f"{base}/images", json={"name": alpine_ref.ref, "format": "erofs"})
        assert response.status_code == 202, response.text
        assert response.json()["format"] == "erofs"
        ready = wait_for_status(client, base, f"{name}?format=erofs", {"ready", "failed"})
        assert ready["status"] == "ready" and ready["format"] == "erofs", ready
        assert client.get(f"{base}/images/{name}").json()["format"] == "erofs"  # the only disk
        plain = client.post(f"{base}/images", json={"name": alpine_ref.ref})
        assert plain.status_code == 202 and plain.json()["format"] == "ext4"
        wait_for_status(client, base, f"{name}?format=ext4", {"ready"})
        listed = client.get(f"{base}/images").json()
        assert sorted(i["format"] for i in listed) == ["erofs", "ext4"]
        bad = client.post(f"{base}/images", json={"name": alpine_ref.ref, "format": "xfs"})
        assert bad.status_code == 400 and bad.json()["code"] == "invalid_request"
