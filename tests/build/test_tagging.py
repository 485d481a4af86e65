"""``ImageManager.tag`` (and naming images by ID): a new local tag without a pull."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
from support.pushed import PushedImage

from hypeman_images import ImageManager, ImageStatus
from hypeman_images.build.pipeline import build_resolved
from hypeman_images.errors import Conflict, InvalidArgument, InvalidReference, NotFound
from hypeman_images.store.images import StoredImage


@pytest.fixture
def built(data_dir: Path, alpine_ref: PushedImage) -> tuple[ImageManager, StoredImage]:
    manager = ImageManager(data_dir)
    stored = manager.pull(alpine_ref.ref, labels={"team": "infra"})
    return manager, stored


def test_a_tag_in_the_same_repository_is_a_link(
    built: tuple[ImageManager, StoredImage], alpine_ref: PushedImage
) -> None:
    manager, stored = built
    with manager:
        target = alpine_ref.ref.replace(":3.20.3", ":stable")
        tagged = manager.tag(alpine_ref.ref, target)
        assert (tagged.name, tagged.digest) == (target, stored.record.digest)
        assert tagged.local_names == ("3.20.3", "stable") and tagged.tags == {"team": "infra"}
        assert os.readlink(stored.directory.parent / "stable") == stored.directory.name
        manager.delete(alpine_ref.ref)
        assert manager.get(target).disk == stored.disk  # the other tag keeps the disk


def test_a_tag_in_another_repository_stores_the_image_there_sharing_the_disk(
    built: tuple[ImageManager, StoredImage], alpine_ref: PushedImage
) -> None:
    manager, stored = built
    with manager:
        target = f"{alpine_ref.registry.host}/mirror/alpine:v1"
        tagged = manager.tag(alpine_ref.digest_ref, target)
        assert tagged.status is ImageStatus.READY and tagged.name == target
        assert tagged.disk is not None and tagged.disk != stored.disk
        assert os.path.samefile(tagged.disk, stored.disk)  # a hard link, not a copy
        assert tagged.record.layers == stored.record.layers  # gc keeps the blobs for it
        manager.delete(alpine_ref.digest_ref)
        assert manager.get(target).disk == tagged.disk and tagged.disk.stat().st_size > 0
        # Two repositories once held the digest; now one: its ID names it again.
        assert (
            manager.get(stored.record.digest[7:19]).name
            == f"{target.rsplit(':', 1)[0]}@{stored.record.digest}"
        )


def test_image_ids_name_images(
    built: tuple[ImageManager, StoredImage], alpine_ref: PushedImage
) -> None:
    manager, stored = built
    digest = stored.record.digest
    with manager:
        for name in (digest, digest[7:19], f"sha256:{digest[7:20]}", digest[7:]):
            assert manager.get(name).digest == digest, name
        with pytest.raises(NotFound):
            manager.get(digest[7:18])  # 11 digits: only a repository name
        with pytest.raises(NotFound):
            manager.get("0123456789ab")
        # Hex is a repository name too: a local image of that name wins, as in docker.
        manager.tag(alpine_ref.ref, "0123456789ab")
        assert manager.get("0123456789ab").name == "docker.io/library/0123456789ab:latest"
        manager.delete("0123456789ab")
        manager.tag(digest[7:19], f"{alpine_ref.registry.host}/other/alpine:x")
        with pytest.raises(InvalidArgument, match="ambiguous") as caught:
            manager.get(digest[7:19])
        assert "other/alpine@" in str(caught.value) and "library/alpine@" in str(caught.value)
        # One digest in two repositories: more digits would not help, a name does.
        assert str(caught.value).endswith("name one of them")
        assert manager.delete(f"{alpine_ref.registry.host}/other/alpine:x")
        assert manager.delete(digest[7:19]) == [
            alpine_ref.ref,
            f"{alpine_ref.registry.host}/library/alpine@{digest}",
        ]


def test_tag_refusals(built: tuple[ImageManager, StoredImage], alpine_ref: PushedImage) -> None:
    manager, _ = built
    host = alpine_ref.registry.host
    with manager:
        with pytest.raises(NotFound):
            manager.tag(f"{host}/library/alpine:never", f"{host}/library/alpine:x")
        with pytest.raises(InvalidReference, match="tag reference"):
            manager.tag(alpine_ref.ref, f"{host}/library/alpine@sha256:{'0' * 64}")
        with pytest.raises(InvalidReference):
            manager.tag(alpine_ref.ref, "UPPER:x")


def test_tagging_an_image_that_is_not_ready_is_a_conflict(
    data_dir: Path, alpine_ref: PushedImage
) -> None:
    release, started = threading.Event(), threading.Event()

    def held(resolved: Any, **kwargs: Any) -> StoredImage:
        started.set()
        assert release.wait(30)
        return build_resolved(resolved, **kwargs)

    with ImageManager(data_dir, builder=held) as manager:
        manager.create(alpine_ref.ref)
        assert started.wait(10)
        for source in (alpine_ref.ref, alpine_ref.digest_ref):
            with pytest.raises(Conflict, match="not ready"):
                manager.tag(source, alpine_ref.ref.replace(":3.20.3", ":t"))
        release.set()
        manager.wait(alpine_ref.ref, timeout=60)
        assert manager.tag(alpine_ref.ref, alpine_ref.ref.replace(":3.20.3", ":t")).status is (
            ImageStatus.READY
        )
