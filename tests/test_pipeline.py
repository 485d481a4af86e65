"""End to end: a real registry on 127.0.0.1 → hypeman-images pull → rootfs.ext4 + metadata.json.

Each disk is checked with ``e2fsck -fn`` and read back path by path (type,
mode, owner, size, content hash, link target, xattrs, hard-link groups)
against what the layers say (the oracle of tests/support/oracle.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.disk import compare_trees, e2fsck_clean, read_disk_tree
from support.push import push_image
from support.pushed import PushedImage
from support.users import UnprivilegedUser

from hypeman_images.cli import main
from hypeman_images.digest import Digest
from hypeman_images.flatten import Limits
from hypeman_images.manager import ImageManager
from hypeman_images.pipeline import BuildStats, room_for_content

CLI = str(Path(sys.executable).with_name("hypeman-images"))


def pull(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, "pull", "--data-dir", str(data_dir), *args], capture_output=True, text=True
    )


def metadata(data_dir: Path, image: PushedImage, digest: str) -> dict[str, object]:
    path = data_dir / "images" / image.registry.host / image.repository / digest[7:]
    doc: dict[str, object] = json.loads((path / "metadata.json").read_text())
    return doc


def check_disk(disk: Path, image: PushedImage) -> None:
    e2fsck_clean(disk)
    differences = compare_trees(image.expected_tree, read_disk_tree(disk))
    assert differences == [], "\n".join(differences[:50])


def test_alpine(alpine_ref: PushedImage, data_dir: Path) -> None:
    result = pull(data_dir, alpine_ref.ref)
    assert result.returncode == 0, result.stderr
    disk = Path(result.stdout.strip())
    digest = alpine_ref.manifest_digest
    assert disk == (
        data_dir
        / "images"
        / alpine_ref.registry.host
        / "library/alpine"
        / digest[7:]
        / "rootfs.ext4"
    )
    check_disk(disk, alpine_ref)
    tree = read_disk_tree(disk)
    assert (tree["/etc/shadow"].uid, tree["/etc/shadow"].gid) == (0, 42)
    assert tree["/etc/shadow"].mode == 0o640
    assert tree["/bin/sh"].type == "symlink" and tree["/bin/sh"].target == "/bin/busybox"
    release = subprocess.run(
        ["debugfs", "-R", "cat /etc/alpine-release", str(disk)], capture_output=True, text=True
    ).stdout
    assert release.strip() == "3.20.3"

    doc = metadata(data_dir, alpine_ref, digest)
    assert doc["status"] == "ready"
    assert doc["digest"] == digest
    assert doc["name"] == alpine_ref.ref
    assert doc["cmd"] == ["/bin/sh"] and doc["entrypoint"] is None
    assert doc["env"] == ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    assert doc["platform"] == "linux/amd64"
    assert doc["size_bytes"] == disk.stat().st_size
    assert doc["layers"] == [json.loads(alpine_ref.image.manifest)["layers"][0]["digest"]]
    tag = disk.parent.parent / "3.20.3"
    assert os.readlink(tag) == digest[7:]


def test_busybox_oci_layout_byte_for_byte(busybox_ref: PushedImage, data_dir: Path) -> None:
    result = pull(data_dir, busybox_ref.ref)
    assert result.returncode == 0, result.stderr
    disk = Path(result.stdout.strip())
    assert disk.parent.name == busybox_ref.manifest_digest[7:]
    check_disk(disk, busybox_ref)
    assert metadata(data_dir, busybox_ref, busybox_ref.manifest_digest)["cmd"] == ["sh"]


def test_multilayer_whiteouts_opaque_hardlinks(multilayer_ref: PushedImage, data_dir: Path) -> None:
    result = pull(data_dir, multilayer_ref.ref)
    assert result.returncode == 0, result.stderr
    check_disk(Path(result.stdout.strip()), multilayer_ref)


def test_index_resolves_to_host_platform(multiplatform_ref: PushedImage, data_dir: Path) -> None:
    result = pull(data_dir, multiplatform_ref.ref)
    assert result.returncode == 0, result.stderr
    disk = Path(result.stdout.strip())
    # The store keys builds by the platform manifest's digest, not the index's.
    assert disk.parent.name == multiplatform_ref.image.manifest_digest[7:]
    check_disk(disk, multiplatform_ref)


def test_platform_option_picks_arm64(multiplatform_ref: PushedImage, data_dir: Path) -> None:
    assert multiplatform_ref.index is not None
    result = pull(data_dir, "--platform", "linux/arm64", "--json", multiplatform_ref.ref)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["platform"] in ("linux/arm64", "linux/arm64/v8")
    assert doc["digest"] != multiplatform_ref.image.manifest_digest


def one_line_error(stderr: str) -> bool:
    """The failure is told in exactly one line, after any progress lines."""
    errors = [line for line in stderr.splitlines() if line.startswith("hypeman-images: error:")]
    return len(errors) == 1 and stderr.endswith(errors[0] + "\n")


def only_cache_left(data_dir: Path) -> bool:
    images = data_dir / "images"
    leftovers = [p for p in images.rglob("*") if p.is_file()] if images.exists() else []
    return leftovers == []


@pytest.mark.parametrize(
    ("name", "code", "says"),
    [
        ("UPPER/Case", 2, "lower-case"),
        ("alpine@sha256:1234", 2, "invalid digest"),
        ("", 2, "empty"),
    ],
    ids=["upper-case", "bad-digest", "empty"],
)
def test_invalid_names_fail_before_network(data_dir: Path, name: str, code: int, says: str) -> None:
    result = pull(data_dir, name)
    assert result.returncode == code
    assert says in result.stderr
    assert one_line_error(result.stderr)
    assert only_cache_left(data_dir)


def test_unknown_repository_and_tag(alpine_ref: PushedImage, data_dir: Path) -> None:
    host = alpine_ref.registry.host
    for ref in (f"{host}/no/such-repo:1", f"{host}/library/alpine:no-such-tag"):
        result = pull(data_dir, ref)
        assert result.returncode == 3, result.stderr
        assert "not found" in result.stderr.lower()
        assert one_line_error(result.stderr)
    assert only_cache_left(data_dir)


def test_platform_missing_from_index(multiplatform_ref: PushedImage, data_dir: Path) -> None:
    result = pull(data_dir, "--platform", "linux/s390x", multiplatform_ref.ref)
    assert result.returncode == 6
    assert "linux/amd64" in result.stderr and "linux/arm64" in result.stderr
    assert only_cache_left(data_dir)


def test_ready_digest_is_reused_and_tag_moves(
    alpine_ref: PushedImage, busybox_ref: PushedImage, data_dir: Path
) -> None:
    with ImageManager(data_dir) as manager:
        first = manager.pull(alpine_ref.ref)
        disk_mtime = first.disk.stat().st_mtime_ns
        stats = BuildStats()
        again = manager.pull(alpine_ref.digest_ref, stats=stats)
        assert stats.reused and stats.downloaded_bytes == 0
        assert again.disk.stat().st_mtime_ns == disk_mtime
    assert main(["inspect", "--data-dir", str(data_dir), alpine_ref.ref]) == 0


def test_unprivileged_pull_keeps_owners(
    alpine_ref: PushedImage, tmp_path: Path, unprivileged_user: UnprivilegedUser
) -> None:
    if not unprivileged_user.needs_switch:
        pytest.skip("already unprivileged: every other test covers this case")
    if unprivileged_user.run([CLI, "--version"], capture_output=True).returncode != 0:
        pytest.skip(f"nobody cannot run {CLI}: a parent of the checkout is not searchable")
    data_dir = tmp_path / "nobody-data"
    data_dir.mkdir()
    unprivileged_user.own(data_dir)
    env = {**os.environ, "HOME": str(data_dir)}
    result = unprivileged_user.run(
        [CLI, "pull", "--data-dir", str(data_dir), alpine_ref.ref],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    disk = Path(result.stdout.strip())
    assert disk.stat().st_uid == 65534
    check_disk(disk, alpine_ref)
    assert Digest.parse(alpine_ref.manifest_digest).encoded == disk.parent.name


def test_same_digest_gives_byte_identical_disk(multilayer_ref: PushedImage, tmp_path: Path) -> None:
    disks = []
    for name in ("one", "two"):
        result = pull(tmp_path / name, "--json", "--disk-digest", multilayer_ref.ref)
        assert result.returncode == 0, result.stderr
        doc = json.loads(result.stdout)
        disk = Path(doc["disk"])
        assert doc["disk_sha256"] == "sha256:" + hashlib.sha256(disk.read_bytes()).hexdigest()
        disks.append(disk.read_bytes())
    assert disks[0] == disks[1]


def test_disk_digest_is_opt_in(alpine_ref: PushedImage, tmp_path: Path) -> None:
    result = pull(tmp_path, "--json", alpine_ref.ref)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["disk_sha256"] is None
    metadata = json.loads((Path(doc["disk"]).parent / "metadata.json").read_text())
    assert metadata["disk_sha256"] is None


def test_free_space_option(alpine_ref: PushedImage, tmp_path: Path) -> None:
    small = json.loads(
        pull(tmp_path / "small", "--json", "--free-space", "0", alpine_ref.ref).stdout
    )
    large = json.loads(
        pull(tmp_path / "large", "--json", "--free-space", "64M", alpine_ref.ref).stdout
    )
    # More free space brings more inodes (one per 16 KiB), so metadata grows a little too.
    assert large["content_bytes"] >= small["content_bytes"]
    grown = large["size_bytes"] - small["size_bytes"]
    assert 64 << 20 <= grown <= (64 << 20) + (8 << 20), grown
    free = subprocess.run(
        ["dumpe2fs", "-h", large["disk"]], capture_output=True, text=True, check=True
    ).stdout
    free_blocks = int(
        next(line for line in free.splitlines() if line.startswith("Free blocks:")).split()[-1]
    )
    assert free_blocks * 4096 >= 64 << 20


def test_tag_moves_when_the_registry_moves_it(
    alpine_ref: PushedImage, busybox_ref: PushedImage, data_dir: Path
) -> None:
    registry = alpine_ref.registry
    ref = f"{registry.host}/moving/app:latest"
    push_image(registry.url, "moving/app", "latest", alpine_ref.image)
    first = Path(pull(data_dir, ref).stdout.strip())
    push_image(registry.url, "moving/app", "latest", busybox_ref.image)
    second = Path(pull(data_dir, ref).stdout.strip())
    assert first.parent != second.parent
    link = second.parent.parent / "latest"
    assert os.readlink(link) == second.parent.name
    # The old digest stays built and reachable by digest, without a download.
    assert first.exists()
    with ImageManager(data_dir) as manager:
        stats = BuildStats()
        manager.pull(f"{registry.host}/moving/app@{alpine_ref.image.manifest_digest}", stats=stats)
        assert stats.downloaded_bytes == 0


def test_limits_from_the_command_line(alpine_ref: PushedImage, data_dir: Path) -> None:
    result = pull(data_dir, "--max-layer-size", "1M", alpine_ref.ref)
    assert result.returncode == 7, result.stderr
    assert one_line_error(result.stderr)
    assert "max_layer_bytes" in result.stderr or "layer" in result.stderr
    result = pull(data_dir, "--max-entries", "10", alpine_ref.ref)
    assert result.returncode == 7
    assert "max_entries" in result.stderr or "entries" in result.stderr
    doc = metadata(data_dir, alpine_ref, alpine_ref.manifest_digest)
    assert doc["status"] == "failed" and doc["error"]
    assert pull(data_dir, alpine_ref.ref).returncode == 0


def test_pinned_by_index_digest_is_found_by_that_digest(
    multiplatform_ref: PushedImage, data_dir: Path
) -> None:
    # `docker pull` prints the index's digest; users pin that, builds are per platform.
    pinned = multiplatform_ref.digest_ref
    assert pull(data_dir, pinned).returncode == 0
    shown = subprocess.run(
        [CLI, "inspect", "--json", "--data-dir", str(data_dir), pinned],
        capture_output=True,
        text=True,
    )
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert doc["digest"] == multiplatform_ref.image.manifest_digest
    assert doc["index_digest"] == multiplatform_ref.manifest_digest
    with ImageManager(data_dir) as manager:
        stats = BuildStats()
        manager.pull(pinned, stats=stats)
        assert stats.reused, "a ready build pinned by its index digest needs no network"
    removed = subprocess.run(
        [CLI, "rm", "--data-dir", str(data_dir), pinned], capture_output=True, text=True
    )
    assert removed.returncode == 0, removed.stderr


def test_digest_shaped_tag_is_refused_before_the_network(data_dir: Path) -> None:
    result = pull(data_dir, "127.0.0.1:9/hx:" + "c" * 64)
    assert result.returncode == 2, result.stderr
    assert "looks like a digest" in result.stderr
    assert only_cache_left(data_dir)


def test_blob_and_manifest_limits_from_the_command_line(
    alpine_ref: PushedImage, data_dir: Path
) -> None:
    result = pull(data_dir, "--max-blob-size", "1M", alpine_ref.ref)
    assert result.returncode == 7, result.stderr
    assert "--max-blob-size" in result.stderr
    result = pull(data_dir, "--max-manifest-size", "100", alpine_ref.ref)
    assert result.returncode == 7, result.stderr
    assert "limit" in result.stderr
    # Nothing was downloaded past the refusals but documents.
    blobs = data_dir / "cache" / "blobs" / "sha256"
    layer = json.loads(alpine_ref.image.manifest)["layers"][0]["digest"][7:]
    assert not (blobs / layer).exists()


def test_two_pass_flag_builds_the_same_tree_on_an_exactly_sized_disk(
    alpine_ref: PushedImage, tmp_path: Path
) -> None:
    one = json.loads(pull(tmp_path / "one", "--json", alpine_ref.ref).stdout)
    two = json.loads(pull(tmp_path / "two", "--json", "--two-pass", alpine_ref.ref).stdout)
    check_disk(Path(one["disk"]), alpine_ref)
    check_disk(Path(two["disk"]), alpine_ref)
    # The one-pass disk keeps inodes for as many entries as its tar could hold.
    assert two["size_bytes"] < one["size_bytes"] <= two["size_bytes"] + (8 << 20)


GiB = 1 << 30


def test_room_for_content_leaves_the_download_mke2fs_metadata_and_free_space() -> None:
    # 100 GiB free, 4 GiB still to download, 16 MiB of free space asked in the disk.
    left = 96 * GiB
    assert room_for_content(100 * GiB, 4 * GiB, 16 << 20) == left - left // 16 - (16 << 20)
    assert room_for_content(GiB, 2 * GiB, 0) == 0  # the download alone does not fit
    assert room_for_content(64 << 20, 0, 64 << 20) == 0


@pytest.mark.parametrize(
    ("free", "layer", "image"),
    [
        # A host with room: the defaults speak, sized for big CUDA/ML images (~20 GB).
        (500 * GiB, 32 * GiB, 64 * GiB),
        # 40 GiB free: a layer may take 32 GiB, the image only what fits.
        (40 * GiB, 32 * GiB, 40 * GiB - 40 * GiB // 16),
        # 8 GiB free: both stop where the disk would be full.
        (8 * GiB, 8 * GiB - GiB // 2, 8 * GiB - GiB // 2),
    ],
    ids=["roomy-host", "40GiB-free", "8GiB-free"],
)
def test_the_limits_a_bomb_meets_are_the_defaults_lowered_to_the_free_space(
    free: int, layer: int, image: int
) -> None:
    """Where a build stops a bomb: ``tests/test_faults.py`` runs one into the lowered limit.

    Inflating a bomb to the defaults themselves (tens of GiB) takes minutes, so
    the arithmetic is what is checked here for them.
    """
    limits = Limits().within(room_for_content(free, 0, 0))
    assert (limits.max_layer_bytes, limits.max_image_bytes) == (layer, image)
    assert limits.max_entries == Limits().max_entries  # only the byte limits move
