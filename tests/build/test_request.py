"""What a request brings besides its name: labels (hypeman's tags), platform, credentials."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from support.pushed import PushedImage

from hypeman_images import ImageManager, ImageStatus
from hypeman_images.build.options import BuildOptions
from hypeman_images.build.pipeline import build_resolved
from hypeman_images.build.request import MAX_LABELS, check_labels, image_request, labels_match
from hypeman_images.errors import Conflict, InvalidArgument, InvalidPlatform
from hypeman_images.oci.spec import Platform
from hypeman_images.registry.credentials import Credential
from hypeman_images.store.images import StoredImage


@pytest.mark.parametrize(
    "labels",
    [
        pytest.param({"": "x"}, id="empty-key"),
        pytest.param({"k" * 129: "x"}, id="key-too-long"),
        pytest.param({"k": "v" * 257}, id="value-too-long"),
        pytest.param({"team!": "x"}, id="key-character"),
        pytest.param({"team": "a\nb"}, id="value-newline"),
        pytest.param({f"k{i}": "v" for i in range(MAX_LABELS + 1)}, id="too-many"),
    ],
)
def test_labels_outside_hypemans_tags_schema_are_refused(labels: dict[str, str]) -> None:
    with pytest.raises(InvalidArgument):
        check_labels(labels)


def test_labels_inside_the_schema_pass_and_match_all_pairs() -> None:
    labels = check_labels({"team": "infra", "app:name": "a b/c=d+e@f-g_h.i", "empty": ""})
    assert labels_match(labels, {"team": "infra", "empty": ""})
    assert labels_match(labels, {})
    assert not labels_match(labels, {"team": "infra", "env": "ci"})
    assert not labels_match(labels, {"team": "web"})


def test_a_request_parses_its_platform_and_hides_its_credentials() -> None:
    request = image_request(
        BuildOptions(), platform="arm64", credentials=Credential("u", "Pw-5c1f", origin="x")
    )
    assert request.options.platform == Platform("linux", "arm64")
    assert request.credential is not None and request.credential.borrowed
    assert request.credential.describe() == "the credentials given with the request"
    assert "Pw-5c1f" not in repr(request) and "Pw-5c1f" not in repr(request.credential)
    other = image_request(BuildOptions(), credentials=Credential("u", "Pw-other"))
    assert request.fingerprint != other.fingerprint != b""
    empty = image_request(BuildOptions(), credentials=Credential())
    assert empty.credential is None and empty.fingerprint == b""  # "omitted or empty"
    with pytest.raises(InvalidPlatform):
        image_request(BuildOptions(), platform="windows/amd64")


def test_labels_are_set_kept_replaced_and_filtered(data_dir: Path, alpine_ref: PushedImage) -> None:
    with ImageManager(data_dir) as manager:
        created = manager.create(alpine_ref.ref, labels={"team": "infra"})
        assert created.tags == {"team": "infra"}
        assert manager.wait(alpine_ref.ref, timeout=60).tags == {"team": "infra"}
        assert manager.create(alpine_ref.ref).tags == {"team": "infra"}  # none given: kept
        replaced = manager.create(alpine_ref.ref, labels={"env": "ci"})
        assert replaced.status is ImageStatus.READY and replaced.tags == {"env": "ci"}
        assert [i.name for i in manager.list({"env": "ci"})] == [alpine_ref.ref]
        assert manager.list({"team": "infra"}) == [] and len(manager.list()) == 1
        # By digest, ready: no network, and the labels still apply.
        assert manager.create(alpine_ref.digest_ref, labels={}).tags == {}


class Held:
    """The pipeline, held until released."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, resolved: Any, **kwargs: Any) -> StoredImage:
        self.started.set()
        assert self.release.wait(30)
        return build_resolved(resolved, **kwargs)


def test_a_build_in_flight_is_joined_only_with_the_same_credentials(
    data_dir: Path, alpine_ref: PushedImage
) -> None:
    held = Held()
    # The test registry wants no credentials; any given are sent, and accepted.
    mine = Credential("me", "Pw-mine-1")
    with ImageManager(data_dir, builder=held) as manager:
        manager.create(alpine_ref.ref, credentials=mine)
        assert held.started.wait(10)
        manager.create(alpine_ref.ref, credentials=Credential("me", "Pw-mine-1"))  # joins
        for other in (None, Credential("me", "Pw-other-2")):
            with pytest.raises(Conflict, match="other credentials"):
                manager.create(alpine_ref.ref, credentials=other)
        held.release.set()
        assert manager.wait(alpine_ref.ref, timeout=60).status is ImageStatus.READY
        record = manager.get(alpine_ref.ref).record
        assert record.borrowed_credentials
        assert manager.create(alpine_ref.ref).status is ImageStatus.READY  # built: no conflict
    for path in data_dir.rglob("*"):
        if path.is_file():
            assert b"Pw-mine-1" not in path.read_bytes(), path


def test_an_interrupted_build_with_borrowed_credentials_fails_at_recovery(
    data_dir: Path, alpine_ref: PushedImage
) -> None:
    with ImageManager(data_dir) as manager:
        stored = manager.pull(alpine_ref.ref, credentials=Credential("me", "Pw-x"))
    (stored.directory.parent / alpine_ref.tag).unlink()
    record = stored.record.evolve(status=ImageStatus.PULLING)
    (stored.directory / "metadata.json").write_bytes(record.to_json())
    with ImageManager(data_dir) as manager:
        assert manager.recover().resumed == ()
        failed = manager.get(alpine_ref.digest_ref)
        assert failed.status is ImageStatus.FAILED
        assert failed.error is not None and "ask for it again" in failed.error
