"""The disk artifact's format: recipes, the canonical config, the manifest, determinism.

No registry here: what is pushed and fetched is tested in ``test_push`` and
``test_fetch``; this file pins what the bytes are and what a reader refuses.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from support.fleet import CHUNK, RUNTIME, artifact_of, recipe_for, subject_for

from hypeman_images.errors import CorruptDisk, DiskArtifactInvalid, InvalidArgument
from hypeman_images.fleet.artifact import (
    ARTIFACT_TYPE,
    CHUNK_TYPE,
    MATCH_ANNOTATION,
    check_artifact,
    parse_manifest,
)
from hypeman_images.fleet.config import CONFIG_TYPE, DiskConfig, Runtime
from hypeman_images.fleet.pack import pack_disk
from hypeman_images.fleet.recipe import DiskFormat, Recipe, canonical_json
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.reference import parse_reference
from hypeman_images.oci.spec import OCI_MANIFEST
from hypeman_images.store.images import ImageRecord, ImageStatus

SUBJECT = subject_for("alpine")
RECIPE = recipe_for(SUBJECT)

# -- recipes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "matches"),
    [
        pytest.param({"e2fsprogs": "1.47.1"}, True, id="other-e2fsprogs-still-matches"),
        pytest.param({"free_space": 0}, False, id="free-space"),
        pytest.param({"one_pass": False}, False, id="two-pass"),
        pytest.param({"builder": "hypeman-images 0.2.0"}, False, id="builder"),
        pytest.param({"options": {"fallback": "staged"}}, False, id="option"),
        pytest.param({"format": DiskFormat.EROFS}, False, id="format"),
        pytest.param({"source": subject_for("other").digest}, False, id="source"),
    ],
)
def test_a_recipe_matches_only_with_every_byte_changing_choice_equal(
    change: dict[str, Any], matches: bool
) -> None:
    other = replace(RECIPE, **change)
    assert RECIPE.matches(other) is matches
    assert other.matches(RECIPE) is matches
    assert not RECIPE.exact(other)
    assert RECIPE.exact(replace(RECIPE)) and RECIPE.matches(RECIPE)


def test_the_recipe_tag_is_a_valid_tag_naming_subject_format_and_recipe() -> None:
    tag = RECIPE.tag
    assert re.fullmatch(rf"sha256-{SUBJECT.digest.encoded}\.ext4\.[0-9a-f]{{16}}", tag)
    assert len(tag) <= 128
    parse_reference(f"127.0.0.1:5000/cache/disks:{tag}")  # the reference grammar takes it
    assert replace(RECIPE, e2fsprogs="1.47.1").tag != tag  # a tag per exact recipe


def test_the_recipe_key_is_pinned() -> None:
    """The per-recipe tag is derived from this key: a change would orphan every cached disk."""
    recipe = Recipe(Digest("sha256", "a" * 64), DiskFormat.EXT4, "b", "1.47.2", True, 0)
    canonical = (
        '{"builder":"b","e2fsprogs":"1.47.2","format":"ext4","free_space":0,"one_pass":true,'
        '"options":{},"source":"sha256:' + "a" * 64 + '"}'
    )
    assert recipe.key == hashlib.sha256(canonical.encode()).hexdigest()
    assert recipe.key == "443dc32739fdd97b8eacc8ff93e0cc649ba33f98e12a38c1b4849e44c9878d6b"


# -- the config ----------------------------------------------------------------------


def _config(**changes: Any) -> DiskConfig:
    config = DiskConfig(RECIPE, RUNTIME, 3 * CHUNK + 4096, Digest.of(b"disk"), CHUNK)
    return replace(config, **changes)


def test_the_config_is_canonical_json_and_parses_back() -> None:
    config = _config()
    data = config.to_bytes()
    assert data == canonical_json(json.loads(data))
    assert b": " not in data and b", " not in data
    assert DiskConfig.parse(data) == config
    doc = json.loads(data)
    assert set(doc) == {
        "chunk_size", "disk_sha256", "disk_size", "format", "recipe", "runtime", "source",
    }  # fmt: skip
    assert doc["recipe"] == {
        "builder": "hypeman-images 0.1.0", "e2fsprogs": "1.47.2", "free_space": 16 * CHUNK,
        "one_pass": True, "options": {},
    }  # fmt: skip


def test_runtime_round_trips_through_an_image_record() -> None:
    record = ImageRecord(
        name="r/alpine:3", digest=str(SUBJECT.digest), status=ImageStatus.READY,
        created_at="2026-01-01T00:00:00Z", entrypoint=["/init"], cmd=None, env=["A=1"],
        working_dir="/w", user="1000", exposed_ports=["80/tcp"], volumes=["/data"],
        labels={"k": "v"}, stop_signal="SIGINT", platform="linux/arm64",
        image_created="2025-01-01T00:00:00Z", config_digest="sha256:" + "c" * 64,
    )  # fmt: skip
    runtime = Runtime.from_record(record)
    assert Runtime.from_json(json.loads(json.dumps(runtime.to_json()))) == runtime
    again = ImageRecord(
        name=record.name, digest=record.digest, status=record.status,
        created_at=record.created_at, **runtime.record_fields(),
    )  # fmt: skip
    assert again == record


@pytest.mark.parametrize(
    ("patch", "says"),
    [
        pytest.param({"format": "ntfs"}, "format 'ntfs'", id="unknown-format"),
        pytest.param({"disk_size": 0}, "disk_size", id="empty-disk"),
        pytest.param({"chunk_size": "64M"}, "chunk_size", id="chunk-size-text"),
        pytest.param({"disk_sha256": "sha256:xyz"}, "disk_sha256", id="bad-sha"),
        pytest.param({"disk_sha256": "sha512:" + "a" * 128}, "sha512", id="sha512"),
        pytest.param({"source": None}, "source", id="no-source"),
        pytest.param({"recipe": {"builder": "x"}}, "recipe.e2fsprogs", id="short-recipe"),
        pytest.param({"runtime": {"env": "A=1"}}, "runtime.env", id="env-not-a-list"),
    ],
)
def test_a_malformed_config_is_refused_naming_the_field(patch: dict[str, Any], says: str) -> None:
    doc = json.loads(_config().to_bytes())
    doc.update(patch)
    with pytest.raises(DiskArtifactInvalid, match=re.escape(says)):
        DiskConfig.parse(json.dumps(doc).encode())


# -- the manifest ------------------------------------------------------------------


def test_the_manifest_is_deterministic(ext4_disk: Path) -> None:
    """The same disk and recipe give the same manifest, byte for byte."""
    first = pack_disk(ext4_disk, SUBJECT, RECIPE, RUNTIME, chunk_size=CHUNK, parallel=2)
    second = pack_disk(ext4_disk, SUBJECT, RECIPE, RUNTIME, chunk_size=CHUNK, parallel=1)
    assert first.manifest.data == second.manifest.data and first.digest == second.digest
    assert first == artifact_of(ext4_disk.read_bytes(), SUBJECT, RECIPE)
    other = pack_disk(ext4_disk, SUBJECT, replace(RECIPE, free_space=0), RUNTIME, chunk_size=CHUNK)
    assert other.digest != first.digest
    assert [c.blob for c in other.chunks] == [c.blob for c in first.chunks]  # blobs shared


def test_the_manifest_says_what_the_format_says(ext4_disk: Path) -> None:
    artifact = pack_disk(ext4_disk, SUBJECT, RECIPE, RUNTIME, chunk_size=CHUNK)
    doc = json.loads(artifact.manifest.data)
    assert artifact.manifest.data == canonical_json(doc)
    assert doc["mediaType"] == OCI_MANIFEST and doc["artifactType"] == ARTIFACT_TYPE
    assert doc["subject"] == {
        "mediaType": OCI_MANIFEST, "digest": str(SUBJECT.digest), "size": SUBJECT.size,
    }  # fmt: skip
    assert doc["config"]["mediaType"] == CONFIG_TYPE
    size = ext4_disk.stat().st_size
    assert len(doc["layers"]) == size // CHUNK == 12
    for i, layer in enumerate(doc["layers"]):
        assert layer["mediaType"] == CHUNK_TYPE
        assert layer["annotations"] == {
            "vnd.hypeman.disk.chunk.offset": str(i * CHUNK),
            "vnd.hypeman.disk.chunk.size": str(CHUNK),
        }
    assert doc["annotations"] == {
        "vnd.hypeman.disk.format": "ext4",
        "vnd.hypeman.disk.match": RECIPE.match_key,
        "vnd.hypeman.disk.recipe": RECIPE.key,
    }
    assert artifact.config.disk_sha256 == Digest.of(ext4_disk.read_bytes())


def test_pack_refuses_a_disk_that_changed_since_it_was_built(ext4_disk: Path) -> None:
    with pytest.raises(CorruptDisk, match="changed since"):
        pack_disk(ext4_disk, SUBJECT, RECIPE, RUNTIME, expected_sha256=Digest.of(b"other"))
    with pytest.raises(InvalidArgument, match="multiple of 4096"):
        pack_disk(ext4_disk, SUBJECT, RECIPE, RUNTIME, chunk_size=1000)
    with pytest.raises(InvalidArgument, match="source"):
        pack_disk(ext4_disk, subject_for("other"), RECIPE, RUNTIME)


def _manifest_doc() -> dict[str, Any]:
    return dict(json.loads(artifact_of(bytes(3 * CHUNK), SUBJECT, RECIPE).manifest.data))


@pytest.mark.parametrize(
    ("patch", "says"),
    [
        pytest.param({"artifactType": "application/vnd.example.sbom"}, "not a hypeman disk",
                     id="unknown-artifact-type"),
        pytest.param({"artifactType": None}, "not a hypeman disk", id="no-artifact-type"),
        pytest.param({"mediaType": "application/vnd.oci.image.index.v1+json"},
                     "not an OCI image manifest", id="an-index"),
        pytest.param({"subject": None}, "subject", id="no-subject"),
        pytest.param({"layers": []}, "no chunks", id="no-chunks"),
        pytest.param({"config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                 "digest": "sha256:" + "0" * 64, "size": 2}},
                     "config is a application/vnd.oci.image.config", id="image-config"),
    ],
)  # fmt: skip
def test_a_manifest_that_is_not_a_disk_artifact_is_refused(
    patch: dict[str, Any], says: str
) -> None:
    doc = _manifest_doc()
    doc.update(patch)
    data = canonical_json(doc)
    with pytest.raises(DiskArtifactInvalid, match=re.escape(says)):
        parse_manifest(data, Digest.of(data))


@pytest.mark.parametrize(
    ("layer", "says"),
    [
        pytest.param({"mediaType": "application/vnd.oci.image.layer.v1.tar+zstd"}, "not a",
                     id="layer-type"),
        pytest.param({"annotations": {"vnd.hypeman.disk.chunk.offset": "-1",
                                      "vnd.hypeman.disk.chunk.size": "1"}}, "not a number",
                     id="negative-offset"),
        pytest.param({"annotations": {}}, "not a number", id="no-annotations"),
    ],
)  # fmt: skip
def test_a_chunk_without_its_type_or_numbers_is_refused(layer: dict[str, Any], says: str) -> None:
    doc = _manifest_doc()
    doc["layers"][1].update(layer)
    data = canonical_json(doc)
    with pytest.raises(DiskArtifactInvalid, match=says):
        parse_manifest(data, Digest.of(data))


def _checked(doc: dict[str, Any], subject: Digest = SUBJECT.digest) -> None:
    artifact = artifact_of(bytes(3 * CHUNK), SUBJECT, RECIPE)
    data = canonical_json(doc)
    manifest = parse_manifest(data, Digest.of(data))
    check_artifact(manifest, artifact.config, artifact.config_data, subject)


def test_the_manifest_is_held_to_its_subject_its_config_and_the_chunk_layout() -> None:
    _checked(_manifest_doc())  # the unchanged one passes
    other = subject_for("other").digest
    with pytest.raises(DiskArtifactInvalid, match=f"built from {SUBJECT.digest}, not from {other}"):
        _checked(_manifest_doc(), other)
    doc = _manifest_doc()
    doc["layers"][0], doc["layers"][1] = doc["layers"][1], doc["layers"][0]
    with pytest.raises(DiskArtifactInvalid, match=r"chunk 0 claims .* at 1048576"):
        _checked(doc)
    doc = _manifest_doc()
    doc["layers"].pop()
    with pytest.raises(DiskArtifactInvalid, match="has 2 chunks"):
        _checked(doc)
    doc = _manifest_doc()
    doc["annotations"][MATCH_ANNOTATION] = "0" * 64
    with pytest.raises(DiskArtifactInvalid, match="contradict its config"):
        _checked(doc)
