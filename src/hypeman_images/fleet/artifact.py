"""The disk artifact's manifest: written canonically, read back with every claim checked.

An OCI image manifest carrying an artifact (image-spec 1.1 manifest.md,
"Guidelines for Artifact Usage", the case of an artifact with its own config
and layers): ``artifactType`` names it, ``config`` is the :class:`DiskConfig`,
``layers`` the disk in chunks, ``subject`` the platform manifest the disk was
built from, so that registries and the referrers tag schema list it as that
image's referrer (distribution-spec 1.1, "Listing Referrers"). Annotation keys
follow the ``vnd.<vendor>.`` form buildkit's ``vnd.docker.reference.type``
uses, and carry nothing that changes between two pushes of the same disk.
docs/disk-artifacts.md is the format's description.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hypeman_images.errors import DiskArtifactInvalid, HypemanError
from hypeman_images.fleet.config import CONFIG_TYPE, MAX_CONFIG_BYTES, DiskConfig
from hypeman_images.fleet.recipe import canonical_json
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.spec import OCI_MANIFEST, Descriptor
from hypeman_images.oci.wire import decimal, load_json
from hypeman_images.registry.referrers import Referrer

ARTIFACT_TYPE = "application/vnd.hypeman.disk.v1"
CHUNK_TYPE = "application/vnd.hypeman.disk.chunk.v1+zstd"
CHUNK_SIZE = 64 * 1024 * 1024
FORMAT_ANNOTATION = "vnd.hypeman.disk.format"
RECIPE_ANNOTATION = "vnd.hypeman.disk.recipe"  # Recipe.key: exact matches
MATCH_ANNOTATION = "vnd.hypeman.disk.match"  # Recipe.match_key: any e2fsprogs release
OFFSET_ANNOTATION = "vnd.hypeman.disk.chunk.offset"
SIZE_ANNOTATION = "vnd.hypeman.disk.chunk.size"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # what registries must accept (distribution-spec "Push")


@dataclass(frozen=True)
class Chunk:
    """``size`` bytes of the disk from ``offset``, stored zstd-compressed as ``blob``."""

    offset: int
    size: int
    blob: Descriptor

    def to_json(self) -> dict[str, Any]:
        annotations = {OFFSET_ANNOTATION: str(self.offset), SIZE_ANNOTATION: str(self.size)}
        return {**_descriptor_json(self.blob), "annotations": annotations}


@dataclass(frozen=True)
class ArtifactManifest:
    """A disk artifact's manifest as read, before its config is: its own claims only."""

    digest: Digest
    data: bytes
    subject: Descriptor
    config: Descriptor
    chunks: tuple[Chunk, ...]
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class DiskArtifact:
    """A whole disk artifact: its manifest, and the config that manifest names."""

    manifest: ArtifactManifest
    config: DiskConfig
    config_data: bytes

    @property
    def digest(self) -> Digest:
        """The manifest's digest: the artifact's name in the registry."""
        return self.manifest.digest

    @property
    def chunks(self) -> tuple[Chunk, ...]:
        return self.manifest.chunks

    def referrer(self) -> Referrer:
        """The artifact's entry in its subject's referrers index (annotations copied)."""
        return Referrer(
            OCI_MANIFEST, self.digest, len(self.manifest.data), ARTIFACT_TYPE,
            dict(self.manifest.annotations),
        )  # fmt: skip


def annotations_for(config: DiskConfig) -> dict[str, str]:
    """The manifest's annotations: what a lookup filters referrers by, before any fetch."""
    return {
        FORMAT_ANNOTATION: str(config.format),
        MATCH_ANNOTATION: config.recipe.match_key,
        RECIPE_ANNOTATION: config.recipe.key,
    }


def build_artifact(
    subject: Descriptor, config: DiskConfig, chunks: Sequence[Chunk]
) -> DiskArtifact:
    """The artifact of a packed disk, its manifest in canonical JSON (one disk, one digest)."""
    if subject.digest != config.source:
        raise ValueError(f"subject {subject.digest} is not the recipe's source {config.source}")
    config_data = config.to_bytes()
    config_blob = Descriptor(CONFIG_TYPE, Digest.of(config_data), len(config_data))
    annotations = annotations_for(config)
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": _descriptor_json(config_blob),
        "layers": [chunk.to_json() for chunk in chunks],
        "subject": _descriptor_json(subject),
        "annotations": annotations,
    }
    data = canonical_json(doc)
    manifest = ArtifactManifest(
        Digest.of(data), data, subject, config_blob, tuple(chunks), annotations
    )
    return check_artifact(manifest, config, config_data, subject.digest)


def parse_manifest(data: bytes, digest: Digest) -> ArtifactManifest:
    """Read a disk artifact's manifest (whose bytes were checked against ``digest``).

    :class:`DiskArtifactInvalid` if it is not one: another ``artifactType``
    (an unknown artifact is never guessed at), no subject, a config or a
    layer of another media type, chunk annotations that are not numbers.
    """
    if len(data) > MAX_MANIFEST_BYTES:
        raise DiskArtifactInvalid(f"disk artifact {digest} is {len(data)} bytes, over the limit")
    try:
        doc = load_json(data)
    except ValueError as exc:
        raise DiskArtifactInvalid(f"disk artifact {digest} is not valid JSON") from exc
    what = f"artifact {digest}"
    if not isinstance(doc, dict) or doc.get("mediaType") != OCI_MANIFEST:
        raise DiskArtifactInvalid(f"{what} is not an OCI image manifest")
    if doc.get("artifactType") != ARTIFACT_TYPE:
        raise DiskArtifactInvalid(
            f"{what} is not a hypeman disk: its artifactType is {doc.get('artifactType')!r}, "
            f"not {ARTIFACT_TYPE}"
        )
    if doc.get("schemaVersion") != 2:
        raise DiskArtifactInvalid(f"{what} has schemaVersion {doc.get('schemaVersion')!r}")
    config = _descriptor(doc.get("config"), f"{what}: config")
    if config.media_type != CONFIG_TYPE or config.size > MAX_CONFIG_BYTES:
        raise DiskArtifactInvalid(f"{what}: config is a {config.media_type} of {config.size} bytes")
    layers = doc.get("layers")
    if not isinstance(layers, list) or not layers:
        raise DiskArtifactInvalid(f"{what} has no chunks")
    chunks = tuple(_chunk(raw, f"{what}: chunk {i}") for i, raw in enumerate(layers))
    annotations = doc.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise DiskArtifactInvalid(f"{what}: annotations are not a map")
    subject = _descriptor(doc.get("subject"), f"{what}: subject")
    strings = {k: v for k, v in annotations.items() if isinstance(k, str) and isinstance(v, str)}
    return ArtifactManifest(digest, data, subject, config, chunks, strings)


def check_artifact(
    manifest: ArtifactManifest, config: DiskConfig, config_data: bytes, subject: Digest
) -> DiskArtifact:
    """Hold the manifest and its config to each other and to the ``subject`` asked for.

    The subject must be the image asked for, and the config's source; the
    annotations must say what the config says; the chunks must tile the disk
    in order, each ``chunk_size`` long but the last. :class:`DiskArtifactInvalid`
    otherwise.
    """
    what = f"disk artifact {manifest.digest}"
    if manifest.subject.digest != subject or config.source != subject:
        built_from = (
            manifest.subject.digest if manifest.subject.digest != subject else config.source
        )
        raise DiskArtifactInvalid(f"{what} was built from {built_from}, not from {subject}")
    if Digest.of(config_data, manifest.config.digest.algorithm) != manifest.config.digest:
        raise DiskArtifactInvalid(f"{what}: its config does not hash to {manifest.config.digest}")
    expected = annotations_for(config)
    said = {key: manifest.annotations.get(key) for key in expected}
    if said != expected:
        raise DiskArtifactInvalid(f"{what}: its annotations {said} contradict its config")
    size, step = config.disk_size, config.chunk_size
    count = -(-size // step)
    if len(manifest.chunks) != count:
        raise DiskArtifactInvalid(
            f"{what} has {len(manifest.chunks)} chunks; a {size}-byte disk in chunks of "
            f"{step} needs {count}"
        )
    for i, chunk in enumerate(manifest.chunks):
        offset = i * step
        if (chunk.offset, chunk.size) != (offset, min(step, size - offset)):
            raise DiskArtifactInvalid(
                f"{what}: chunk {i} claims {chunk.size} bytes at {chunk.offset}; the layout "
                f"says {min(step, size - offset)} at {offset}"
            )
    return DiskArtifact(manifest, config, config_data)


def _descriptor_json(descriptor: Descriptor) -> dict[str, Any]:
    return {
        "mediaType": descriptor.media_type,
        "digest": str(descriptor.digest),
        "size": descriptor.size,
    }


def _descriptor(raw: Any, what: str) -> Descriptor:
    if not isinstance(raw, dict):
        raise DiskArtifactInvalid(f"{what} is missing or not a descriptor")
    kind, size = raw.get("mediaType"), raw.get("size")
    if not isinstance(kind, str) or not isinstance(size, int) or isinstance(size, bool):
        raise DiskArtifactInvalid(f"{what} lacks a media type or a size")
    if size < 0:
        raise DiskArtifactInvalid(f"{what} has a negative size")
    try:
        digest = Digest.parse(str(raw.get("digest")))
    except HypemanError as exc:
        raise DiskArtifactInvalid(f"{what}: {exc.message}") from exc
    return Descriptor(kind, digest, size)


def _chunk(raw: Any, what: str) -> Chunk:
    blob = _descriptor(raw, what)
    if blob.media_type != CHUNK_TYPE:
        raise DiskArtifactInvalid(f"{what} is a {blob.media_type}, not a {CHUNK_TYPE}")
    annotations = raw.get("annotations") or {}
    numbers = []
    for key in (OFFSET_ANNOTATION, SIZE_ANNOTATION):
        value = annotations.get(key) if isinstance(annotations, dict) else None
        number = decimal(value) if isinstance(value, str) else None
        if number is None:
            raise DiskArtifactInvalid(f"{what}: annotation {key} is {value!r:.80}, not a number")
        numbers.append(number)
    return Chunk(numbers[0], numbers[1], blob)


__all__ = [
    "ARTIFACT_TYPE",
    "CHUNK_SIZE",
    "CHUNK_TYPE",
    "ArtifactManifest",
    "Chunk",
    "DiskArtifact",
    "annotations_for",
    "build_artifact",
    "check_artifact",
    "parse_manifest",
]
