"""Fetching: broken and hostile artifacts, and a failing cache repo, each refused cleanly.

Every case pushes an artifact that differs from an honest one in one way
only (``support.fleet.forge``), or puts a fault between the client and the
registry (``support.faultproxy``), and checks the error's class, that its
message says why, and that nothing is left beside the destination.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import zstandard
from support.faultproxy import Fault, fault_proxy
from support.fleet import (
    CHUNK,
    FAST,
    Forged,
    MiB,
    forge,
    honest,
    recipe_for,
    subject_for,
)
from support.registry import RegistryServer

from hypeman_images.disk.e2fsprogs import E2fsprogs
from hypeman_images.disk.fsck_erofs import FsckErofs
from hypeman_images.errors import (
    DigestMismatch,
    DiskArtifactInvalid,
    HypemanError,
    LimitExceeded,
    NotFound,
    TransientError,
    Unauthorized,
)
from hypeman_images.fleet import fetch as fetch_module
from hypeman_images.fleet.artifact import CHUNK_TYPE, MATCH_ANNOTATION, Chunk, DiskArtifact
from hypeman_images.fleet.config import DiskConfig
from hypeman_images.fleet.fetch import fetch_disk
from hypeman_images.fleet.lookup import find_disk, read_artifact
from hypeman_images.fleet.pack import compress_chunk
from hypeman_images.fleet.recipe import DiskFormat
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.reference import Reference
from hypeman_images.oci.spec import Descriptor
from hypeman_images.registry.client import RegistryClient
from hypeman_images.registry.referrers import add_referrer

SUBJECT = subject_for("the-image")
RECIPE = recipe_for(SUBJECT)


def _nothing_left(dest: Path) -> None:
    assert list(dest.parent.iterdir()) == [], "a temp file was left behind"


def _fetch_forged(
    client: RegistryClient, repo: Reference, forged: Forged, dest: Path, tools: E2fsprogs
) -> None:
    artifact = read_artifact(client, repo, forged.digest, SUBJECT.digest)
    fetch_disk(client, repo, artifact, dest, tools).commit()


def _honest(ext4_disk: Path) -> tuple[bytes, DiskConfig, list[bytes], list[int]]:
    disk = ext4_disk.read_bytes()
    config, blobs, sizes = honest(disk, SUBJECT, RECIPE)
    return disk, config, blobs, sizes


def test_an_honest_forged_artifact_fetches(
    client: RegistryClient, repo: Reference, ext4_disk: Path, dest: Path, tools: E2fsprogs
) -> None:
    """The control: forge() unchanged makes an artifact that passes every check."""
    disk, config, blobs, sizes = _honest(ext4_disk)
    forged = forge(client, repo, SUBJECT, config, blobs, sizes)
    _fetch_forged(client, repo, forged, dest, tools)
    assert dest.read_bytes() == disk


def test_a_config_claiming_another_sha256_is_refused(
    client: RegistryClient, repo: Reference, ext4_disk: Path, dest: Path, tools: E2fsprogs
) -> None:
    _, config, blobs, sizes = _honest(ext4_disk)
    lying = replace(config, disk_sha256=Digest.of(b"another disk"))
    forged = forge(client, repo, SUBJECT, lying, blobs, sizes)
    with pytest.raises(DiskArtifactInvalid, match=f"hashes to .*not to the {lying.disk_sha256}"):
        _fetch_forged(client, repo, forged, dest, tools)
    _nothing_left(dest)


def _replace_chunk(blobs: list[bytes], index: int, blob: bytes) -> list[bytes]:
    return [blob if i == index else b for i, b in enumerate(blobs)]


def _lying_frame(content: bytes, declared: int) -> bytes:
    """A zstd frame whose header says ``declared`` bytes while its blocks hold ``content``."""
    frame = zstandard.ZstdCompressor(write_content_size=False, write_checksum=False).compress(
        content
    )
    assert frame[4] & 0xE0 == 0  # no content size field, not single-segment: a window byte
    return (
        frame[:4] + bytes([frame[4] | 0x80]) + frame[5:6] + struct.pack("<I", declared) + frame[6:]
    )


@pytest.mark.parametrize(
    ("chunk", "says"),
    [
        pytest.param(lambda raw: compress_chunk(raw)[:-200], "is truncated", id="truncated-frame"),
        pytest.param(lambda raw: compress_chunk(raw[: len(raw) // 2]),
                     "is truncated: its zstd frame holds 524288", id="short-frame"),
        pytest.param(lambda raw: compress_chunk(raw + bytes(CHUNK)),
                     "would inflate to 2097152 bytes, past its declared 1048576: a bomb",
                     id="bomb-declared"),
        pytest.param(lambda raw: _lying_frame(bytes(64 * MiB), CHUNK), "not valid zstd",
                     id="bomb-lying-header"),
        pytest.param(lambda raw: zstandard.ZstdCompressor(write_content_size=False).compress(raw),
                     "no content size", id="no-content-size"),
        pytest.param(lambda raw: raw, "not valid zstd", id="not-compressed"),
    ],
)  # fmt: skip
def test_a_chunk_that_does_not_inflate_to_its_declared_size_is_refused(
    client: RegistryClient,
    repo: Reference,
    ext4_disk: Path,
    dest: Path,
    tools: E2fsprogs,
    chunk: object,
    says: str,
) -> None:
    disk, config, blobs, sizes = _honest(ext4_disk)
    raw = disk[3 * CHUNK : 4 * CHUNK]  # the random file's bytes: no run of zeros
    bad = chunk(raw)
    forged = forge(client, repo, SUBJECT, config, _replace_chunk(blobs, 3, bad), sizes)
    with pytest.raises(DiskArtifactInvalid, match=re.escape(says)):
        _fetch_forged(client, repo, forged, dest, tools)
    _nothing_left(dest)


def test_inflating_stops_at_the_declared_size_even_without_a_header_check(tmp_path: Path) -> None:
    """The bound on output holds by itself: a frame that hides its size stops one piece past."""
    bomb = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(64 * MiB))
    chunk = Chunk(0, CHUNK, Descriptor(CHUNK_TYPE, Digest.of(bomb), len(bomb)))
    target = tmp_path / "disk"
    fd = os.open(target, os.O_RDWR | os.O_CREAT)
    try:
        source = fetch_module._Source(iter([bomb]))
        watch = (threading.Event(), lambda offset, piece, zeros: None)
        problem = fetch_module._write(source, chunk, fd, watch, skip_zeros=False)
    finally:
        os.close(fd)
    assert problem is not None and "a bomb" in problem
    assert target.stat().st_size <= CHUNK


def test_a_disk_that_fails_fsck_is_refused_though_its_sha256_is_right(
    client: RegistryClient, repo: Reference, ext4_disk: Path, dest: Path, tools: E2fsprogs
) -> None:
    broken = bytearray(ext4_disk.read_bytes())
    # Group 0's free block count (ext4 group descriptor at block 1, bg_free_blocks_count_lo
    # at +0x0C): e2fsck -fn counts otherwise, and says so.
    (free,) = struct.unpack_from("<H", broken, 4096 + 0x0C)
    struct.pack_into("<H", broken, 4096 + 0x0C, free + 7)
    config, blobs, sizes = honest(bytes(broken), SUBJECT, RECIPE)  # its sha256, re-declared
    forged = forge(client, repo, SUBJECT, config, blobs, sizes)
    with pytest.raises(DiskArtifactInvalid, match=r"(?s)e2fsck -fn found problems .*Free blocks"):
        _fetch_forged(client, repo, forged, dest, tools)
    _nothing_left(dest)


def test_an_artifact_of_another_image_is_refused(
    client: RegistryClient, repo: Reference, ext4_disk: Path, registry: RegistryServer
) -> None:
    other = subject_for("another-image")
    disk = ext4_disk.read_bytes()
    config, blobs, sizes = honest(disk, other, recipe_for(other))
    # Pushed under the tag of RECIPE, for SUBJECT: the tag lies about what it holds.
    forged = forge(client, repo, other, config, blobs, sizes, tag=RECIPE.tag)
    with pytest.raises(DiskArtifactInvalid, match=f"built from {other.digest}, not from"):
        find_disk(client, repo, RECIPE)
    with pytest.raises(DiskArtifactInvalid, match=f"built from {other.digest}"):
        read_artifact(client, repo, forged.digest, SUBJECT.digest)
    # Listed in SUBJECT's referrers index, it is skipped, not taken.
    other_recipe = replace(RECIPE, e2fsprogs="1.47.0")
    entry = read_artifact(client, repo, forged.digest, other.digest).referrer()
    hint = {**entry.annotations, MATCH_ANNOTATION: other_recipe.match_key}
    entry = replace(entry, annotations=hint)
    add_referrer(client, repo, SUBJECT.digest, entry, settle=0)
    assert find_disk(client, repo, other_recipe) is None


def test_an_unknown_artifact_type_is_refused(
    client: RegistryClient, repo: Reference, ext4_disk: Path
) -> None:
    _, config, blobs, sizes = _honest(ext4_disk)
    forge(
        client, repo, SUBJECT, config, blobs, sizes,
        tag=RECIPE.tag, fields={"artifactType": "application/vnd.example.sbom.v1"},
    )  # fmt: skip
    with pytest.raises(DiskArtifactInvalid, match="not a hypeman disk: its artifactType is"):
        find_disk(client, repo, RECIPE)


def test_an_artifact_of_another_format_than_asked_and_an_oversized_one_are_refused(
    client: RegistryClient, repo: Reference, ext4_disk: Path, dest: Path, tools: E2fsprogs
) -> None:
    """e2fsprogs check ext4 disks only: an artifact that says it is EROFS is not fetched
    with them, nor an ext4 one with fsck.erofs."""
    _, config, blobs, sizes = _honest(ext4_disk)
    erofs = replace(config, recipe=replace(RECIPE, format=DiskFormat.EROFS))
    forged = forge(client, repo, SUBJECT, erofs, blobs, sizes)
    with pytest.raises(DiskArtifactInvalid, match="is an erofs disk, not the ext4 one asked for"):
        _fetch_forged(client, repo, forged, dest, tools)
    plain = forge(client, repo, SUBJECT, config, blobs, sizes)
    artifact = read_artifact(client, repo, plain.digest, SUBJECT.digest)
    fsck_erofs = FsckErofs(Path("/nonexistent/fsck.erofs"), "1.5")  # refused before it is run
    with pytest.raises(DiskArtifactInvalid, match="is an ext4 disk, not the erofs one asked for"):
        fetch_disk(client, repo, artifact, dest, fsck_erofs)
    with pytest.raises(LimitExceeded, match="over the 4096-byte limit"):
        fetch_disk(client, repo, artifact, dest, tools, max_disk_bytes=4096)
    _nothing_left(dest)


# -- a failing cache repository ------------------------------------------------------


@pytest.fixture
def pushed(client: RegistryClient, repo: Reference, ext4_disk: Path) -> DiskArtifact:
    _, config, blobs, sizes = _honest(ext4_disk)
    forge(client, repo, SUBJECT, config, blobs, sizes, tag=RECIPE.tag)
    found = find_disk(client, repo, RECIPE)
    assert found is not None
    return found.artifact


FAILURES = pytest.mark.parametrize(
    ("status", "error"),
    [(401, Unauthorized), (403, Unauthorized), (404, NotFound), (500, TransientError)],
    ids=["401", "403", "404", "500"],
)


@FAILURES
def test_a_failing_cache_repo_fails_the_lookup_with_its_error(
    pushed: DiskArtifact,
    repo: Reference,
    registry: RegistryServer,
    status: int,
    error: type[HypemanError],
) -> None:
    with fault_proxy(registry.url) as proxy, RegistryClient(config=FAST) as client:
        proxy.add(Fault(f"/v2/{repo.repository}/", "status", status=status))
        proxied = replace(repo, registry=proxy.host)
        if status == 404:
            assert find_disk(client, proxied, RECIPE) is None  # a miss: build it locally
            return
        with pytest.raises(error) as caught:
            find_disk(client, proxied, RECIPE)
    if status in (401, 403):
        assert f"anonymous access to repository {repo.repository}" in str(caught.value)


@FAILURES
def test_a_failing_chunk_fails_the_fetch_and_leaves_nothing(
    pushed: DiskArtifact,
    repo: Reference,
    registry: RegistryServer,
    dest: Path,
    tools: E2fsprogs,
    status: int,
    error: type[HypemanError],
) -> None:
    digest = str(pushed.chunks[5].blob.digest)
    with fault_proxy(registry.url) as proxy, RegistryClient(config=FAST) as client:
        proxy.add(Fault(digest, "status", status=status))
        with pytest.raises(error, match=digest if status in (404, 500) else "anonymous"):
            fetch_disk(client, replace(repo, registry=proxy.host), pushed, dest, tools)
    _nothing_left(dest)


def test_a_corrupted_chunk_is_a_digest_mismatch(
    pushed: DiskArtifact, repo: Reference, registry: RegistryServer, dest: Path, tools: E2fsprogs
) -> None:
    with fault_proxy(registry.url) as proxy, RegistryClient(config=FAST) as client:
        proxy.add(Fault(str(pushed.chunks[2].blob.digest), "corrupt", after_bytes=100))
        proxied = replace(repo, registry=proxy.host)
        with pytest.raises(DigestMismatch, match=str(pushed.chunks[2].blob.digest)):
            fetch_disk(client, proxied, pushed, dest, tools)
    _nothing_left(dest)


def test_a_chunk_cut_short_is_fetched_again_then_given_up(
    pushed: DiskArtifact, repo: Reference, registry: RegistryServer, dest: Path, tools: E2fsprogs
) -> None:
    digest = str(pushed.chunks[4].blob.digest)
    with fault_proxy(registry.url) as proxy, RegistryClient(config=FAST) as client:
        proxied = replace(repo, registry=proxy.host)
        cut = proxy.add(Fault(digest, "cut", after_bytes=1000, times=2))
        fetch_disk(client, proxied, pushed, dest, tools).commit()  # resumed, then it passes
        assert cut.hits == 2
        dest.unlink()
        proxy.add(Fault(digest, "cut", after_bytes=1000))
        with pytest.raises(TransientError):
            fetch_disk(client, proxied, pushed, dest, tools, attempts=2)
    _nothing_left(dest)


def test_the_fetched_disk_is_sparse_where_the_disk_is_zeros(
    pushed: DiskArtifact, client: RegistryClient, repo: Reference, dest: Path, tools: E2fsprogs
) -> None:
    with fetch_disk(client, repo, pushed, dest, tools) as fetched:
        allocated = fetched.path.stat().st_blocks * 512
        assert allocated < pushed.config.disk_size // 2
    _nothing_left(dest)  # leaving the block without commit() removes the temp file
    shutil.rmtree(dest.parent)
