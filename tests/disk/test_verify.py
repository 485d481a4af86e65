"""``verify``: a built disk checked again, as a user would after a scare (disk errors, copies)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from support.pushed import PushedImage
from support.service import CLI


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=os.environ.copy())


def pulled(data_dir: Path, ref: str, *flags: str) -> tuple[Path, Path]:
    result = run("pull", "--json", "--data-dir", str(data_dir), *flags, ref)
    assert result.returncode == 0, result.stderr
    disk = Path(json.loads(result.stdout)["disk"])
    return disk, disk.parent / "metadata.json"


def test_verify_hashes_and_records_on_request(alpine_ref: PushedImage, data_dir: Path) -> None:
    disk, metadata = pulled(data_dir, alpine_ref.ref, "--no-disk-digest")
    sha = "sha256:" + hashlib.sha256(disk.read_bytes()).hexdigest()
    d = ("--data-dir", str(data_dir))

    first = run("verify", "--json", *d, alpine_ref.ref)
    assert first.returncode == 0, first.stderr
    doc = json.loads(first.stdout)
    assert doc["sha256"] == sha and doc["recorded"] is None and doc["recorded_now"] is False
    assert json.loads(metadata.read_text())["disk_sha256"] is None

    recorded = run("verify", "--record", *d, alpine_ref.ref)
    assert recorded.returncode == 0, recorded.stderr
    assert "recorded now" in recorded.stdout
    assert json.loads(metadata.read_text())["disk_sha256"] == sha

    again = run("verify", "--json", *d, alpine_ref.digest_ref)  # by digest too
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["recorded"] == sha


def test_a_changed_disk_fails_against_its_recorded_sha256(
    alpine_ref: PushedImage, data_dir: Path
) -> None:
    disk, metadata = pulled(data_dir, alpine_ref.ref)
    recorded = json.loads(metadata.read_text())["disk_sha256"]
    # One byte of the last block (free space: e2fsck cannot see it, the hash can).
    with disk.open("r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        handle.write(b"\x01")
    result = run("verify", "--json", "--data-dir", str(data_dir), alpine_ref.ref)
    assert result.returncode == 12, result.stderr
    error = json.loads(result.stdout)
    assert error["code"] == "corrupt_disk"
    assert recorded in error["message"] and "pull it again" in error["message"]


def test_a_damaged_filesystem_fails_e2fsck(alpine_ref: PushedImage, data_dir: Path) -> None:
    disk, _ = pulled(data_dir, alpine_ref.ref)
    # Zero the root directory's block (debugfs says where): its entries are gone.
    blocks = subprocess.run(
        ["debugfs", "-R", "blocks /", str(disk)], capture_output=True, text=True, check=True
    ).stdout.split()
    with disk.open("r+b") as handle:
        handle.seek(int(blocks[0]) * 4096)
        handle.write(bytes(4096))
    result = run("verify", "--data-dir", str(data_dir), alpine_ref.ref)
    assert result.returncode == 12
    assert "e2fsck -fn found problems" in result.stderr


def test_verify_of_an_unknown_image_is_not_found(data_dir: Path) -> None:
    result = run("verify", "--data-dir", str(data_dir), "127.0.0.1:1/never/pulled:1")
    assert result.returncode == 3
