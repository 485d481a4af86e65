"""EROFS disks through the disk cache: pushed and fetched as EROFS, checked with fsck.erofs,
kept apart from the ext4 disks of the same image (build/diskcache.py, docs/disk-artifacts.md)."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
from support.fleet import FAST, cache_repo, forge, honest
from support.pushed import PushedImage

from hypeman_images.build.diskcache import (
    BUILDER,
    erofs_recipe,
    planned_recipes,
    recorded_recipe,
    subject_of,
)
from hypeman_images.build.manager import ImageManager
from hypeman_images.build.options import BuildOptions
from hypeman_images.build.pipeline import BuildStats
from hypeman_images.build.pull import resolve
from hypeman_images.disk.e2fsprogs import find_e2fsprogs
from hypeman_images.disk.fsck_erofs import find_fsck_erofs
from hypeman_images.fleet.cache import DiskCache
from hypeman_images.fleet.config import Runtime
from hypeman_images.fleet.lookup import find_disk
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.reference import Reference, parse_reference
from hypeman_images.oci.spec import Descriptor, Platform
from hypeman_images.registry.client import RegistryClient
from hypeman_images.store.formats import DiskFormat
from hypeman_images.store.images import StoredImage

EROFS, EXT4 = DiskFormat.EROFS, DiskFormat.EXT4

pytestmark = pytest.mark.skipif(find_fsck_erofs() is None, reason="needs erofs-utils")


def fast_client() -> RegistryClient:
    return RegistryClient(config=FAST)


def _pull(
    data_dir: Path, ref: str, fmt: DiskFormat, cache: Reference | None
) -> tuple[StoredImage, BuildStats]:
    disk_cache = DiskCache(cache) if cache is not None else None
    options = BuildOptions(format=fmt, disk_cache=disk_cache)
    stats = BuildStats()
    with ImageManager(data_dir, options=options, client_factory=fast_client) as manager:
        stored = manager.pull(ref, stats=stats)  # leaving drains the push
    return stored, stats


def test_an_erofs_disk_is_pushed_and_fetched_as_erofs_beside_the_ext4_one(
    alpine_ref: PushedImage, tmp_path: Path
) -> None:
    repo = cache_repo(alpine_ref.registry.host, "erofs")
    built, stats = _pull(tmp_path / "a", alpine_ref.ref, EROFS, repo)
    assert (stats.disk_cache, built.record.source) == ("miss", "build")
    recipe = recorded_recipe(built.record)
    assert recipe == erofs_recipe(Digest.parse(built.record.digest)) and recipe.builder == BUILDER

    fetched, stats = _pull(tmp_path / "b", alpine_ref.ref, EROFS, repo)
    assert stats.disk_cache == "hit" and stats.fetched_bytes > 0
    assert fetched.disk.name == "rootfs.erofs"
    assert fetched.disk.read_bytes() == built.disk.read_bytes()
    record = json.loads((fetched.disk.parent / "metadata.erofs.json").read_text())
    assert (record["format"], record["source"], record["source_repository"]) == (
        "erofs", "disk-cache", repo.name,
    )  # fmt: skip
    assert record["disk_sha256"] == built.record.disk_sha256
    assert record["content_bytes"] == record["size_bytes"] == built.record.size_bytes
    assert record["tool_versions"] == built.record.tool_versions
    assert not (fetched.disk.parent / "metadata.json").exists()  # no ext4 record made
    with ImageManager(tmp_path / "b", client_factory=fast_client) as manager:
        assert manager.verify(alpine_ref.ref, format=EROFS).recorded == record["disk_sha256"]

    # The ext4 disk of the same image is not the EROFS one: a miss, a build, a push.
    ext4, stats = _pull(tmp_path / "b", alpine_ref.ref, EXT4, repo)
    assert (stats.disk_cache, ext4.record.source, ext4.disk.name) == (
        "miss",
        "build",
        "rootfs.ext4",
    )
    # A third host gets each format's own disk.
    for fmt, theirs in ((EXT4, ext4), (EROFS, built)):
        mine, stats = _pull(tmp_path / "c", alpine_ref.ref, fmt, repo)
        assert (stats.disk_cache, mine.record.format) == ("hit", fmt)
        assert mine.disk.read_bytes() == theirs.disk.read_bytes()
    with fast_client() as client:
        found = find_disk(client, repo, recipe)
    assert found is not None and found.artifact.config.format is EROFS and found.exact


def _erofs_record(alpine_ref: PushedImage, tmp_path: Path) -> tuple[StoredImage, bytes]:
    stored, _ = _pull(tmp_path / "builder", alpine_ref.ref, EROFS, None)
    return stored, stored.disk.read_bytes()


@pytest.mark.parametrize("broken", ["fsck", "sha256"])
def test_a_corrupt_erofs_artifact_falls_back_to_a_build_with_one_warning(
    alpine_ref: PushedImage, tmp_path: Path, caplog: pytest.LogCaptureFixture, broken: str
) -> None:
    """An EROFS artifact that fails fsck.erofs (its sha256 re-declared to match) or
    its sha256 is not taken: one warning, a build, no temp file left."""
    stored, disk = _erofs_record(alpine_ref, tmp_path)
    recipe = erofs_recipe(Digest.parse(stored.record.digest))
    runtime = Runtime.from_record(stored.record)
    if broken == "fsck":
        bad = bytearray(disk)
        bad[1024 + 4] ^= 0xFF  # the superblock's crc32c (erofs_fs.h, erofs_super_block.checksum)
        disk = bytes(bad)
    config, blobs, sizes = honest(disk, subject_of_alpine(alpine_ref), recipe)
    config = replace(config, runtime=runtime)
    if broken == "sha256":
        config = replace(config, disk_sha256=Digest.of(b"another disk"))
    repo = cache_repo(alpine_ref.registry.host, f"bad-erofs-{broken}")
    with fast_client() as client:
        forge(client, repo, subject_of_alpine(alpine_ref), config, blobs, sizes, tag=recipe.tag)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        pulled, stats = _pull(tmp_path / "host", alpine_ref.ref, EROFS, repo)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    said = "fsck.erofs found problems" if broken == "fsck" else "hashes to"
    assert said in warnings[0] and "building" in warnings[0]
    assert (stats.disk_cache, stats.disk_cache_reason) == ("fallback", "invalid_disk_artifact")
    assert pulled.record.source == "build" and pulled.disk.read_bytes() == stored.disk.read_bytes()
    assert not list(pulled.disk.parent.glob(".tmp-*"))


def subject_of_alpine(alpine_ref: PushedImage) -> Descriptor:
    with fast_client() as client:
        return subject_of(resolve(client, parse_reference(alpine_ref.ref), Platform.host()))


def test_an_erofs_build_looks_for_one_recipe_whatever_the_ext4_options(
    alpine_ref: PushedImage,
) -> None:
    """Free space, the build path and e2fsprogs do not enter an EROFS disk: every host
    asks for the same recipe, and never for an ext4 one."""
    with fast_client() as client:
        resolved = resolve(client, parse_reference(alpine_ref.ref), Platform.host())
    options = BuildOptions(format=EROFS)
    planned = planned_recipes(resolved, options, options.limits, None)
    other = planned_recipes(
        resolved, replace(options, free_space=1 << 30, one_pass=False), options.limits, None
    )
    assert planned == other == [erofs_recipe(resolved.digest)]
    ext4 = planned_recipes(resolved, BuildOptions(), options.limits, find_e2fsprogs())
    assert {r.match_key for r in ext4}.isdisjoint({planned[0].match_key})


def test_a_host_without_fsck_erofs_builds_instead_of_taking_an_unchecked_disk(
    alpine_ref: PushedImage,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The artifact is there and sound, but nothing here can check it: one warning saying
    what to install, a build. erofs-utils cannot be removed from the test host, so its
    absence is the finder's answer (what ``find_fsck_erofs`` returns without it)."""
    repo = cache_repo(alpine_ref.registry.host, "erofs-unchecked")
    built, _ = _pull(tmp_path / "a", alpine_ref.ref, EROFS, repo)
    monkeypatch.setattr("hypeman_images.build.diskcache.find_fsck_erofs", lambda: None)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        pulled, stats = _pull(tmp_path / "b", alpine_ref.ref, EROFS, repo)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "fsck.erofs not found" in warnings[0] and "install erofs-utils" in warnings[0]
    assert (stats.disk_cache, stats.disk_cache_reason) == ("fallback", "tool_error")
    assert pulled.record.source == "build" and pulled.disk.read_bytes() == built.disk.read_bytes()
    assert not list(pulled.disk.parent.glob(".tmp-*"))
