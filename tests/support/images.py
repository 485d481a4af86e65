"""Build OCI and Docker images in memory: layers, configs, manifests, indexes.

Everything here is deterministic (gzip mtime 0, fixed ``created`` dates,
compact JSON) so a test that builds the same image twice gets the same
digests. The builders know nothing of the project's own code: they are an
independent reference for what a registry serves.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import zstandard

from .push import push_blob, push_image, push_index, push_manifest, push_oci_layout
from .tar import TarEntry, build_tar

__all__ = [
    "Image",
    "Index",
    "Layer",
    "Platform",
    "alpine_3_20_3",
    "alpine_edge",
    "alpine_multiplatform",
    "make_image",
    "make_index",
    "make_layer",
    "push_blob",
    "push_image",
    "push_index",
    "push_manifest",
    "push_oci_layout",
    "sha256_digest",
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

Compression = Literal["gzip", "zstd", "none"]


def _images_dir() -> Path:
    """The real test images: ``$HYPEMAN_TEST_IMAGES``, else ``shared/images`` by the checkout."""
    if os.environ.get("HYPEMAN_TEST_IMAGES"):
        return Path(os.environ["HYPEMAN_TEST_IMAGES"])
    beside = Path(__file__).resolve().parents[3] / "shared" / "images"
    return beside if beside.is_dir() else Path("/work/shared/images")


IMAGES_DIR = _images_dir()
BUSYBOX_GLIBC_LAYOUT = IMAGES_DIR / "busybox-1.38.0-glibc-oci"
# The digest Docker Hub serves for busybox:1.38.0-glibc (linux/amd64).
BUSYBOX_GLIBC_DIGEST = "sha256:1cfa4e2b09e127b9c4ed43578d3f3c18e7d44ea47b9ea98475c0cbe9086525f8"
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Platform:
    """An image-index platform (image-spec ``image-index.md``)."""

    architecture: str = "amd64"
    os: str = "linux"
    variant: str | None = None

    def as_json(self) -> dict[str, str]:
        out = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            out["variant"] = self.variant
        return out


@dataclass(frozen=True)
class Layer:
    """A layer blob with what a manifest and a config say about it."""

    blob: bytes
    tar: bytes  # the uncompressed tar; its sha256 is the diff_id
    media_type: str

    @property
    def digest(self) -> str:
        return sha256_digest(self.blob)

    @property
    def diff_id(self) -> str:
        return sha256_digest(self.tar)

    @property
    def size(self) -> int:
        return len(self.blob)

    def descriptor(self, media_type: str | None = None) -> dict[str, Any]:
        return {
            "mediaType": media_type or self.media_type,
            "digest": self.digest,
            "size": self.size,
        }


def compress(tar: bytes, compression: Compression) -> bytes:
    """Compress a tar deterministically (gzip with mtime 0, zstd level 3)."""
    if compression == "gzip":
        return gzip.compress(tar, compresslevel=6, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(tar)
    return tar


def layer_media_type(compression: Compression, docker: bool = False) -> str:
    """The OCI (or Docker schema 2) media type of a layer compressed so."""
    if docker:
        if compression != "gzip":
            raise ValueError("Docker schema 2 has only a gzip layer media type")
        return DOCKER_LAYER_GZIP
    return OCI_LAYER + {"gzip": "+gzip", "zstd": "+zstd", "none": ""}[compression]


def make_layer(
    entries: Sequence[TarEntry] | bytes,
    compression: Compression = "gzip",
    *,
    docker: bool = False,
) -> Layer:
    """A layer from tar entries (or from ready tar bytes)."""
    tar = entries if isinstance(entries, bytes) else build_tar(tuple(entries))
    return Layer(compress(tar, compression), tar, layer_media_type(compression, docker))


@dataclass(frozen=True)
class Image:
    """A single-platform image: its config, manifest and layer blobs."""

    layers: tuple[Layer, ...]
    config: bytes
    manifest: bytes
    manifest_media_type: str
    platform: Platform

    @property
    def config_digest(self) -> str:
        return sha256_digest(self.config)

    @property
    def manifest_digest(self) -> str:
        return sha256_digest(self.manifest)

    @property
    def config_json(self) -> dict[str, Any]:
        return dict(json.loads(self.config))

    @property
    def blobs(self) -> dict[str, bytes]:
        """Every blob the manifest references, config first, by digest."""
        out = {self.config_digest: self.config}
        out.update((layer.digest, layer.blob) for layer in self.layers)
        return out

    def descriptor(self) -> dict[str, Any]:
        return {
            "mediaType": self.manifest_media_type,
            "digest": self.manifest_digest,
            "size": len(self.manifest),
            "platform": self.platform.as_json(),
        }


@dataclass(frozen=True)
class Index:
    """An OCI image index (or Docker manifest list) over images."""

    images: tuple[Image, ...]
    manifest: bytes
    media_type: str

    @property
    def digest(self) -> str:
        return sha256_digest(self.manifest)


def make_image(
    layers: Sequence[Layer],
    *,
    entrypoint: Sequence[str] | None = None,
    cmd: Sequence[str] | None = None,
    env: Sequence[str] | None = None,
    working_dir: str | None = None,
    user: str | None = None,
    exposed_ports: Sequence[str] | None = None,
    volumes: Sequence[str] | None = None,
    labels: Mapping[str, str] | None = None,
    stop_signal: str | None = None,
    architecture: str = "amd64",
    os: str = "linux",
    variant: str | None = None,
    created: str = "2024-01-01T00:00:00Z",
    history: Sequence[Mapping[str, Any]] | None = None,
    docker_media_types: bool = False,
    config_extra: Mapping[str, Any] | None = None,
) -> Image:
    """An image whose config holds only the fields given (others are omitted).

    With ``docker_media_types`` the manifest is Docker schema 2 and OCI gzip
    layers are described with the Docker gzip type (same bytes); other layer
    types are kept as they are so tests can build odd mixes on purpose.
    """
    container: dict[str, Any] = {}
    for key, value in (
        ("User", user),
        ("ExposedPorts", {p: {} for p in exposed_ports} if exposed_ports is not None else None),
        ("Env", list(env) if env is not None else None),
        ("Entrypoint", list(entrypoint) if entrypoint is not None else None),
        ("Cmd", list(cmd) if cmd is not None else None),
        ("Volumes", {v: {} for v in volumes} if volumes is not None else None),
        ("WorkingDir", working_dir),
        ("Labels", dict(labels) if labels is not None else None),
        ("StopSignal", stop_signal),
    ):
        if value is not None:
            container[key] = value
    platform = Platform(architecture, os, variant)
    config: dict[str, Any] = {"created": created, **platform.as_json(), "config": container}
    config["rootfs"] = {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]}
    config["history"] = (
        list(history)
        if history is not None
        else [{"created": created, "created_by": f"layer {i}"} for i in range(len(layers))]
    )
    config.update(config_extra or {})
    config_bytes = _json(config)

    def layer_type(layer: Layer) -> str:
        if docker_media_types and layer.media_type == OCI_LAYER + "+gzip":
            return DOCKER_LAYER_GZIP
        return layer.media_type

    media_type = DOCKER_MANIFEST if docker_media_types else OCI_MANIFEST
    manifest = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {
            "mediaType": DOCKER_CONFIG if docker_media_types else OCI_CONFIG,
            "digest": sha256_digest(config_bytes),
            "size": len(config_bytes),
        },
        "layers": [layer.descriptor(layer_type(layer)) for layer in layers],
    }
    return Image(tuple(layers), config_bytes, _json(manifest), media_type, platform)


def make_index(
    images: Sequence[Image],
    *,
    docker: bool = False,
    platforms: Sequence[Platform] | None = None,
) -> Index:
    """An OCI image index (or a Docker manifest list with ``docker``).

    Each entry's platform is the image's own unless ``platforms`` overrides it.
    """
    descriptors = []
    for i, image in enumerate(images):
        desc = image.descriptor()
        if platforms is not None:
            desc["platform"] = platforms[i].as_json()
        descriptors.append(desc)
    media_type = DOCKER_LIST if docker else OCI_INDEX
    body = {"schemaVersion": 2, "mediaType": media_type, "manifests": descriptors}
    return Index(tuple(images), _json(body), media_type)


def _minirootfs_image(
    tarball: str, architecture: str, variant: str | None, docker_media_types: bool
) -> Image:
    """Alpine as Docker Hub builds it: ``FROM scratch``, ``ADD <tarball> /``, ``CMD``.

    Docker's ``ADD`` extracts the tarball and commits a new layer, whose tar
    differs from the tarball's in member order and headers. We cannot
    reproduce docker's exact bytes offline, so the layer blob is the minirootfs
    ``.tar.gz`` itself (a valid gzip'd tar layer with the very same files);
    its digest is the file's sha256 and its diff_id the sha256 of the
    decompressed tar. The file tree (what the tests compare) is identical.
    """
    blob = (IMAGES_DIR / tarball).read_bytes()
    media_type = DOCKER_LAYER_GZIP if docker_media_types else OCI_LAYER + "+gzip"
    layer = Layer(blob, gzip.decompress(blob), media_type)
    history: list[dict[str, Any]] = [
        {"created": "2024-09-06T22:20:07Z", "created_by": f"ADD {tarball} / # buildkit"},
        {"created": "2024-09-06T22:20:07Z", "created_by": 'CMD ["/bin/sh"]', "empty_layer": True},
    ]
    return make_image(
        [layer],
        cmd=["/bin/sh"],
        env=[DEFAULT_PATH],
        architecture=architecture,
        variant=variant,
        created="2024-09-06T22:20:07Z",
        history=history,
        docker_media_types=docker_media_types,
    )


@functools.cache
def alpine_3_20_3(architecture: str = "amd64", docker_media_types: bool = False) -> Image:
    """``alpine:3.20.3`` for ``amd64`` or ``arm64`` (variant v8), one gzip layer."""
    arch_file = {"amd64": "x86_64", "arm64": "aarch64"}[architecture]
    variant = "v8" if architecture == "arm64" else None
    return _minirootfs_image(
        f"alpine-minirootfs-3.20.3-{arch_file}.tar.gz", architecture, variant, docker_media_types
    )


@functools.cache
def alpine_edge() -> Image:
    """Alpine edge (minirootfs 20240923, amd64): a second, different alpine tag."""
    return _minirootfs_image("alpine-minirootfs-20240923-x86_64.tar.gz", "amd64", None, False)


@functools.cache
def alpine_multiplatform() -> Index:
    """An OCI index of alpine 3.20.3 for linux/amd64 and linux/arm64/v8."""
    return make_index([alpine_3_20_3("amd64"), alpine_3_20_3("arm64")])


def _decompress(blob: bytes, media_type: str) -> bytes:
    if media_type.endswith("gzip"):
        return gzip.decompress(blob)
    if media_type.endswith("zstd"):
        return zstandard.ZstdDecompressor().decompressobj().decompress(blob)
    return blob


def image_from_oci_layout(layout_dir: Path | str) -> Image:
    """The single image manifest of an OCI layout, as an ``Image`` (bytes unchanged)."""
    layout = Path(layout_dir)
    (entry,) = json.loads((layout / "index.json").read_text())["manifests"]

    def blob(digest: str) -> bytes:
        return (layout / "blobs" / digest.replace(":", "/")).read_bytes()

    manifest = blob(entry["digest"])
    document = json.loads(manifest)
    layers = tuple(
        Layer(data, _decompress(data, d["mediaType"]), d["mediaType"])
        for d in document["layers"]
        for data in [blob(d["digest"])]
    )
    config = blob(document["config"]["digest"])
    config_json = json.loads(config)
    platform = Platform(config_json["architecture"], config_json["os"], config_json.get("variant"))
    return Image(layers, config, manifest, entry["mediaType"], platform)
