"""End to end: a real registry on 127.0.0.1 → hypeman-images pull → rootfs.ext4 + metadata.json.

Each disk is checked with ``e2fsck -fn`` and read back path by path (type,
mode, owner, size, content hash, link target, xattrs, hard-link groups)
against what the layers say (the oracle of tests/support/oracle.py).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support.disk import compare_trees, e2fsck_clean, read_disk_tree
from support.faultproxy import Fault, fault_proxy
from support.images import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    alpine_3_20_3,
    make_image,
    make_index,
    make_layer,
    push_index,
    push_manifest,
)
from support.oracle import apply_layers
from support.push import push_image
from support.pushed import PushedImage
from support.registry import RegistryServer
from support.tar import directory, file
from support.users import UnprivilegedUser

from hypeman_images.build.manager import ImageManager
from hypeman_images.build.options import BuildOptions
from hypeman_images.build.pipeline import (
    BuildStats,
    Room,
    _shortfall,
    check_room,
    room_for_content,
)
from hypeman_images.cli import main
from hypeman_images.errors import LimitExceeded, StorageError
from hypeman_images.layers.limits import Limits
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.spec import Descriptor
from hypeman_images.store.blobs import BlobStore

CLI = str(Path(sys.executable).with_name("hypeman-images"))


def pull(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, "pull", "--data-dir", str(data_dir), *args], capture_output=True, text=True
    )


def metadata(data_dir: Path, image: PushedImage, digest: str) -> dict[str, object]:
    path = data_dir / "images" / image.registry.host / image.repository / digest[7:]
    doc: dict[str, object] = json.loads((path / "metadata.json").read_text())
    return doc


def inspect_json(data_dir: Path, ref: str) -> dict[str, object]:
    shown = subprocess.run(
        [CLI, "inspect", "--json", "--data-dir", str(data_dir), ref], capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr
    doc: dict[str, object] = json.loads(shown.stdout)
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


@pytest.fixture(scope="module")
def docker_list_ref(registry: RegistryServer) -> PushedImage:
    """``library/alpine:3.20.3-docker``: a Docker manifest list of schema 2 manifests.

    Docker media types throughout, as ``docker push`` of a multi-arch build
    serves them: the list, schema 2 manifests, a
    ``vnd.docker.container.image.v1+json`` config and
    ``vnd.docker.image.rootfs.diff.tar.gzip`` layers (alpine 3.20.3, amd64 and arm64).
    """
    amd64 = alpine_3_20_3("amd64", docker_media_types=True)
    index = make_index([amd64, alpine_3_20_3("arm64", docker_media_types=True)], docker=True)
    digest = push_index(registry.url, "library/alpine", "3.20.3-docker", index)
    tree = apply_layers(layer.tar for layer in amd64.layers)
    return PushedImage(registry, "library/alpine", "3.20.3-docker", digest, amd64, tree, index)


def test_docker_manifest_list_and_schema2(docker_list_ref: PushedImage, data_dir: Path) -> None:
    image = docker_list_ref.image
    manifest = json.loads(image.manifest)
    # What the registry serves is Docker's, not OCI's (else this test proves nothing).
    assert docker_list_ref.index is not None and docker_list_ref.index.media_type == DOCKER_LIST
    assert manifest["mediaType"] == DOCKER_MANIFEST
    assert manifest["config"]["mediaType"] == DOCKER_CONFIG
    assert [layer["mediaType"] for layer in manifest["layers"]] == [DOCKER_LAYER_GZIP]

    result = pull(data_dir, docker_list_ref.ref)
    assert result.returncode == 0, result.stderr
    disk = Path(result.stdout.strip())
    assert disk.parent.name == image.manifest_digest[7:]
    check_disk(disk, docker_list_ref)
    tree = read_disk_tree(disk)
    assert (tree["/etc/shadow"].uid, tree["/etc/shadow"].gid, tree["/etc/shadow"].mode) == (
        0,
        42,
        0o640,
    )
    assert os.readlink(disk.parent.parent / "3.20.3-docker") == image.manifest_digest[7:]

    doc = metadata(data_dir, docker_list_ref, image.manifest_digest)
    assert doc["status"] == "ready"
    assert doc["digest"] == image.manifest_digest
    assert doc["index_digest"] == docker_list_ref.manifest_digest
    assert doc["manifest_media_type"] == DOCKER_MANIFEST
    assert doc["config_digest"] == image.config_digest
    assert doc["layers"] == [manifest["layers"][0]["digest"]]
    assert doc["platform"] == "linux/amd64"
    assert doc["cmd"] == ["/bin/sh"]


def test_docker_schema2_manifest_by_tag(docker_list_ref: PushedImage, data_dir: Path) -> None:
    # A single-platform `docker push`: the schema 2 manifest itself under a tag, no list.
    image = docker_list_ref.image
    registry = docker_list_ref.registry
    tag = "3.20.3-docker-amd64"
    push_manifest(registry.url, "library/alpine", tag, image.manifest, DOCKER_MANIFEST)
    result = pull(data_dir, "--json", f"{registry.host}/library/alpine:{tag}")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["digest"] == image.manifest_digest
    assert doc["manifest_media_type"] == DOCKER_MANIFEST
    assert doc["index_digest"] is None
    check_disk(Path(doc["disk"]), docker_list_ref)


# Env in an order no sort would give, with a name set twice: the process sees the later value,
# so the order is part of the image's meaning (OCI config.md, "Env").
CONFIGURED_ENV = ["PATH=/usr/bin:/bin", "ZED=last-first", "ALPHA=a=b=c", "MODE=one", "MODE=two"]


def test_metadata_carries_the_whole_config(registry: RegistryServer, data_dir: Path) -> None:
    layer = make_layer([directory("srv"), file("srv/entry.sh", b"#!/bin/sh\n", mode=0o755)])
    labels = {"org.opencontainers.image.title": "app", "com.example.zeta": "z", "a.first": "1"}
    image = make_image(
        [layer],
        entrypoint=["/srv/entry.sh", "--flag"],
        cmd=["serve", "--port", "8080"],
        env=CONFIGURED_ENV,
        working_dir="/srv",
        user="1000:1000",
        exposed_ports=["8080/tcp", "53/udp"],
        volumes=["/var/lib/app", "/cache"],
        labels=labels,
        stop_signal="SIGQUIT",
        created="2024-05-06T07:08:09Z",
    )
    digest = push_image(registry.url, "test/configured", "v1", image)
    ref = f"{registry.host}/test/configured:v1"
    result = pull(data_dir, ref)
    assert result.returncode == 0, result.stderr
    disk = Path(result.stdout.strip())

    stored = json.loads((disk.parent / "metadata.json").read_text())
    shown = inspect_json(data_dir, ref)
    for doc in (stored, shown):
        assert doc["name"] == ref
        assert doc["digest"] == digest
        assert doc["status"] == "ready"
        assert doc["size_bytes"] == disk.stat().st_size
        assert doc["entrypoint"] == ["/srv/entry.sh", "--flag"]
        assert doc["cmd"] == ["serve", "--port", "8080"]
        assert doc["env"] == CONFIGURED_ENV
        assert doc["working_dir"] == "/srv"
        assert doc["user"] == "1000:1000"
        # Ports and volumes are JSON object keys in the config: no order to keep.
        assert doc["exposed_ports"] == ["53/udp", "8080/tcp"]
        assert doc["volumes"] == ["/cache", "/var/lib/app"]
        assert doc["labels"] == labels
        assert doc["stop_signal"] == "SIGQUIT"
        assert doc["platform"] == "linux/amd64"
        assert doc["layers"] == [layer.digest]
        assert doc["config_digest"] == image.config_digest
        assert doc["image_created"] == "2024-05-06T07:08:09Z"
        created_at = doc["created_at"]
        assert isinstance(created_at, str)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", created_at), created_at
    assert shown["disk"] == str(disk)
    assert shown["tags"] == ["v1"]


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
    assert one_line_error(result.stderr), result.stderr
    error = result.stderr.splitlines()[-1]
    assert "linux/s390x" in error
    assert "linux/amd64" in error and "linux/arm64/v8" in error
    assert only_cache_left(data_dir)


def test_registry_refusing_with_403_is_unauthorized(
    alpine_ref: PushedImage, data_dir: Path
) -> None:
    # A registry (or a proxy in front of it) that forbids the repository outright:
    # HTTP 403 with no challenge to answer.
    with fault_proxy(alpine_ref.registry.url) as proxy:
        proxy.add(Fault("/manifests/", "status", status=403, body=b'{"errors":[]}'))
        ref = f"{proxy.host}/library/alpine:3.20.3"
        result = pull(data_dir, ref)
        as_json = pull(data_dir, "--json", ref)
    assert result.returncode == 4, result.stderr
    assert one_line_error(result.stderr), result.stderr
    error = result.stderr.splitlines()[-1]
    assert "refused" in error and "library/alpine" in error
    assert f"hypeman-images login {proxy.host}" in error
    assert as_json.returncode == 4
    assert json.loads(as_json.stdout)["code"] == "registry_unauthorized"
    assert only_cache_left(data_dir)


def test_ready_digest_is_reused_when_pulled_by_digest(
    alpine_ref: PushedImage, data_dir: Path
) -> None:
    with ImageManager(data_dir) as manager:
        first = manager.pull(alpine_ref.ref)
        disk_mtime = first.disk.stat().st_mtime_ns
        stats = BuildStats()
        again = manager.pull(alpine_ref.digest_ref, stats=stats)
        assert stats.reused and stats.downloaded_bytes == 0
        assert again.disk == first.disk
        assert again.disk.stat().st_mtime_ns == disk_mtime
    assert main(["inspect", "--data-dir", str(data_dir), alpine_ref.ref]) == 0


def test_tag_moves_onto_an_already_ready_digest(
    alpine_ref: PushedImage, busybox_ref: PushedImage, data_dir: Path
) -> None:
    registry = alpine_ref.registry
    a, b = alpine_ref.image, busybox_ref.image
    push_image(registry.url, "retag/app", "t", a)
    push_image(registry.url, "retag/app", "t2", b)
    # Through a proxy that only watches, so what went over the wire is counted
    # independently of the product's own statistics.
    with fault_proxy(registry.url) as proxy:
        host = proxy.host
        assert pull(data_dir, f"{host}/retag/app:t").returncode == 0
        assert pull(data_dir, f"{host}/retag/app:t2").returncode == 0
        repo_dir = data_dir / "images" / host / "retag/app"
        disk_b = repo_dir / b.manifest_digest[7:] / "rootfs.ext4"
        mtime_b = disk_b.stat().st_mtime_ns
        push_manifest(registry.url, "retag/app", "t", b.manifest, b.manifest_media_type)
        proxy.log.clear()

        result = pull(data_dir, f"{host}/retag/app:t")
        assert result.returncode == 0, result.stderr
        assert Path(result.stdout.strip()) == disk_b
        assert proxy.requests("/blobs/") == [], "a ready digest needs no blob"
        assert [r.path for r in proxy.requests("/manifests/")] == ["/v2/retag/app/manifests/t"]
    assert os.readlink(repo_dir / "t") == b.manifest_digest[7:]
    assert os.readlink(repo_dir / "t2") == b.manifest_digest[7:]
    assert disk_b.stat().st_mtime_ns == mtime_b, "no rebuild"
    # The rule of docs/cli.md: a disk goes with its last tag only through `rm`; a tag
    # moved away by the registry leaves A's disk, reachable by its digest.
    listed = subprocess.run(
        [CLI, "list", "--json", "--data-dir", str(data_dir)], capture_output=True, text=True
    )
    assert listed.returncode == 0, listed.stderr
    tags = {doc["digest"]: sorted(doc["tags"]) for doc in json.loads(listed.stdout)}
    assert tags == {a.manifest_digest: [], b.manifest_digest: ["t", "t2"]}
    old = inspect_json(data_dir, f"{host}/retag/app@{a.manifest_digest}")
    assert old["status"] == "ready" and old["disk"]
    assert Path(str(old["disk"])).is_file()


def test_unprivileged_pull_keeps_owners(
    alpine_ref: PushedImage, unprivileged_user: UnprivilegedUser
) -> None:
    with unprivileged_user.cli_pull(CLI, alpine_ref.ref) as result:
        assert result.returncode == 0, result.stderr
        disk = Path(result.stdout.strip())
        assert disk.stat().st_uid == 65534
        check_disk(disk, alpine_ref)
        assert Digest.parse(alpine_ref.manifest_digest).encoded == disk.parent.name


def test_same_digest_gives_byte_identical_disk(multilayer_ref: PushedImage, tmp_path: Path) -> None:
    disks = []
    for name in ("one", "two"):
        result = pull(tmp_path / name, "--json", multilayer_ref.ref)
        assert result.returncode == 0, result.stderr
        doc = json.loads(result.stdout)
        disk = Path(doc["disk"])
        assert doc["disk_sha256"] == "sha256:" + hashlib.sha256(disk.read_bytes()).hexdigest()
        disks.append(disk.read_bytes())
    assert disks[0] == disks[1]


def test_no_disk_digest_records_none(alpine_ref: PushedImage, tmp_path: Path) -> None:
    result = pull(tmp_path, "--json", "--no-disk-digest", alpine_ref.ref)
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
GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def test_room_for_content_leaves_the_download_mke2fs_metadata_and_free_space() -> None:
    # 100 GiB free, 4 GiB still to download, 16 MiB of free space asked in the disk.
    left = 96 * GiB
    assert room_for_content(100 * GiB, 4 * GiB, 16 << 20) == left - left // 16 - (16 << 20)
    assert room_for_content(GiB, 2 * GiB, 0) == 0  # the download alone does not fit
    assert room_for_content(64 << 20, 0, 64 << 20) == 0


@pytest.mark.parametrize("content", [0, 1, 123_456_789, 5 * GiB])
@pytest.mark.parametrize("free_space", [0, 16 << 20])
def test_what_an_image_needs_is_the_free_space_with_room_for_it(
    content: int, free_space: int
) -> None:
    room = Room(Path("/data/images"), 0, 3 * GiB, free_space)
    need = room.needs(content)
    assert room_for_content(need, room.downloading, free_space) >= content
    assert (
        room_for_content(need - need // 16, room.downloading, free_space) < content or not content
    )


def test_layers_whose_blobs_alone_overflow_the_room_are_refused_before_the_download() -> None:
    room = Room(Path("/data/images"), 300 << 20, 200 << 20, 16 << 20)  # 300 MiB free
    big = Descriptor(GZIP, Digest.of(b"big"), 200 << 20)
    with pytest.raises(StorageError) as caught:
        check_room([big], room)
    assert caught.value.message.startswith(
        "no room in the data dir: /data/images has 300 MiB free; this image needs more than "
    )
    check_room([Descriptor(GZIP, Digest.of(b"small"), 1 << 20)], room)  # fits: no error
    check_room([big], None)  # the check is off


def test_a_room_shortfall_is_a_storage_error_and_a_real_limit_stays_a_limit(
    tmp_path: Path,
) -> None:
    """What stopped the build: the room a byte limit was lowered to, or the limit itself."""
    blobs = BlobStore(tmp_path / "cache")
    blob = gzip.compress(bytes(8 << 20), mtime=0)  # the trailer says 8 MiB
    layer = Descriptor(GZIP, Digest.of(blob), len(blob))
    blobs.put(layer, blob)
    room = Room(tmp_path, 20 << 20, 0, 16 << 20)  # room for 2 MiB and some
    options = BuildOptions()
    limits = options.limits.within(room.content)
    lowered = LimitExceeded(f"layer 0: exceeds Limits.max_layer_bytes={room.content}; raise...")
    explained = _shortfall(lowered, limits, options, room, [layer], blobs)
    assert isinstance(explained, StorageError)
    assert "has 20 MiB free; this image needs about 26 MiB" in explained.message
    assert "inflate to about 8 MiB" in explained.message
    # The same image with a configured limit it is over: the limit speaks, not the disk.
    strict = BuildOptions(limits=Limits(max_layer_bytes=4 << 20))
    limits = strict.limits.within(room.content)
    explained = _shortfall(lowered, limits, strict, room, [layer], blobs)
    assert isinstance(explained, LimitExceeded)
    assert f"inflates to {8 << 20} bytes" in explained.message
    assert f"Limits.max_layer_bytes={4 << 20}" in explained.message
    # A limit that was not lowered (here max_entries) is left as it was.
    entries = LimitExceeded("image has at least 9 entries, over Limits.max_entries=8")
    assert _shortfall(entries, limits, options, room, [layer], blobs) is entries


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
    """Where a build stops a bomb: ``tests/system/test_faults.py`` runs one into the lowered limit.

    Inflating a bomb to the defaults themselves (tens of GiB) takes minutes, so
    the arithmetic is what is checked here for them.
    """
    limits = Limits().within(room_for_content(free, 0, 0))
    assert (limits.max_layer_bytes, limits.max_image_bytes) == (layer, image)
    assert limits.max_entries == Limits().max_entries  # only the byte limits move
