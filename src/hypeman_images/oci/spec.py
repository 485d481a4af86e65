"""Typed models of the OCI image spec and Docker's schema 2, and their media types.

Parsing happens once, here: JSON from the registry becomes frozen dataclasses,
and anything malformed becomes an error that names the document. ``Any``
appears only where decoded JSON is walked.
"""

from __future__ import annotations

import platform as _platform
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hypeman_images.errors import (
    HypemanError,
    InvalidPlatform,
    LayerError,
    LimitExceeded,
    UnsupportedManifest,
)
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.wire import load_json

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
# Sent as Accept on manifest requests, most preferred first.
ACCEPT_MANIFESTS = (OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST)

# Layer media types and the compression each implies.
LAYER_COMPRESSION: Mapping[str, str] = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}
# Manifests and configs are small; anything larger is hostile or broken.
MAX_DOCUMENT_BYTES = 4 * 1024 * 1024


# containerd's platforms package (database.go) spells the names docker accepts;
# a one-word platform is read against them, as ``docker pull --platform arm64`` does.
_KNOWN_OS = frozenset(
    """aix android darwin dragonfly freebsd hurd illumos ios js linux nacl netbsd openbsd
    plan9 solaris windows zos""".split()  # noqa: SIM905 (a table, kept readable)
)
_KNOWN_ARCH = frozenset(
    """386 amd64 amd64p32 arm armbe arm64 arm64be ppc64 ppc64le loong64 mips mipsle mips64
    mips64le mips64p32 mips64p32le ppc riscv riscv64 s390 s390x sparc sparc64 wasm""".split()  # noqa: SIM905
)
# containerd's normalizeArch: the aliases, each with the variant it implies.
_ARCH_ALIASES: Mapping[str, tuple[str, str | None]] = {
    "i386": ("386", None),
    "x86_64": ("amd64", None),
    "x86-64": ("amd64", None),
    "aarch64": ("arm64", None),
    "armhf": ("arm", "v7"),
    "armel": ("arm", "v6"),
}
# containerd's specifierRe: each component, before lower-casing.
_COMPONENT = re.compile(r"[A-Za-z0-9_.-]+")
_PLATFORM_FORMS = "OS/ARCH[/VARIANT] (e.g. linux/amd64, linux/arm64/v8) or ARCH (e.g. arm64)"


@dataclass(frozen=True, order=True)
class Platform:
    """``os/architecture[/variant]``; ``str()`` gives that form."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        """A platform asked for by a user, read as ``docker --platform`` reads it.

        ``linux/amd64``, ``linux/arm64/v8`` (= ``linux/arm64``), ``x86_64`` and
        ``arm64`` (an architecture alone means linux) all parse, case-insensitively,
        normalised as containerd's ``platforms.Parse`` does. An image for another
        OS cannot make a microVM's root disk, so only ``linux`` is accepted.
        Raises :class:`InvalidPlatform` (API code ``invalid_platform``).
        """
        parts = text.split("/")
        if len(parts) > 3 or not all(_COMPONENT.fullmatch(p) for p in parts):
            raise InvalidPlatform(f"invalid platform {text!r}: expected {_PLATFORM_FORMS}")
        parts = [p.lower() for p in parts]
        if len(parts) == 1:
            word = parts[0]
            if word in _KNOWN_OS:
                parts = [word, cls.host().architecture]
            elif word in _KNOWN_ARCH or word in _ARCH_ALIASES:
                parts = ["linux", word]
            else:
                raise InvalidPlatform(
                    f"invalid platform {text!r}: {word!r} is no operating system or "
                    f"architecture docker knows; expected {_PLATFORM_FORMS}"
                )
        if parts[0] != "linux":
            raise InvalidPlatform(
                f"invalid platform {text!r}: only linux images make a microVM's disk"
            )
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None).normalized()

    @classmethod
    def host(cls) -> Platform:
        """The platform of the machine this runs on."""
        machine = _platform.machine().lower()
        arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(
            machine, machine
        )
        return cls("linux", arch, "v7" if arch == "arm" else None).normalized()

    def normalized(self) -> Platform:
        """containerd's ``normalizeArch``: aliases resolved, default variants dropped.

        ``aarch64`` is ``arm64``, whose ``v8`` is the default; ``x86_64`` is
        ``amd64``, whose ``v1`` is; an arm variant is spelled ``v7``, not ``7``.
        """
        arch, variant = _ARCH_ALIASES.get(self.architecture, (self.architecture, None))
        variant = self.variant or variant
        if arch in ("arm64", "arm") and variant and variant[0].isdigit():
            variant = f"v{variant}"
        if (arch, variant) in (("arm64", "v8"), ("arm64", "v8.0"), ("amd64", "v1")):
            variant = None
        return Platform(self.os, arch, variant)

    def matches(self, offered: Platform) -> bool:
        """True if an image built for ``offered`` runs here (variant only when asked)."""
        want, have = self.normalized(), offered.normalized()
        if (want.os, want.architecture) != (have.os, have.architecture):
            return False
        return want.variant is None or want.variant == have.variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: what a manifest says about one blob."""

    media_type: str
    digest: Digest
    size: int
    platform: Platform | None = None
    urls: tuple[str, ...] = ()
    annotations: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The descriptor as the OCI JSON object."""
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": str(self.digest),
            "size": self.size,
        }
        if self.platform:
            out["platform"] = {"os": self.platform.os, "architecture": self.platform.architecture}
            if self.platform.variant:
                out["platform"]["variant"] = self.platform.variant
        if self.urls:
            out["urls"] = list(self.urls)
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


@dataclass(frozen=True)
class Manifest:
    """An image manifest (OCI or Docker schema 2): a config and ordered layers."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True)
class Index:
    """An image index or Docker manifest list."""

    media_type: str
    manifests: tuple[Descriptor, ...]

    def select(self, want: Platform) -> Descriptor:
        """The first manifest for ``want``; :class:`PlatformNotFound` lists the offers."""
        from hypeman_images.errors import PlatformNotFound

        offers = [d for d in self.manifests if d.platform and d.media_type in MANIFEST_TYPES]
        for descriptor in offers:
            assert descriptor.platform is not None
            if want.matches(descriptor.platform):
                return descriptor
        available = ", ".join(sorted({str(d.platform) for d in offers})) or "none"
        raise PlatformNotFound(
            f"no image for platform {want} in this index; available: {available}",
            hint="choose one with --platform",
            api_hint="choose one with the request's platform",
        )


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image configuration that a VM's init and the store need."""

    architecture: str
    os: str
    variant: str | None
    entrypoint: tuple[str, ...] | None
    cmd: tuple[str, ...] | None
    env: tuple[str, ...]
    working_dir: str
    user: str
    exposed_ports: tuple[str, ...]
    volumes: tuple[str, ...]
    labels: Mapping[str, str]
    stop_signal: str | None
    created: str | None
    diff_ids: tuple[Digest, ...]

    @property
    def platform(self) -> Platform:
        """The platform this image was built for."""
        return Platform(self.os, self.architecture, self.variant)


def _load(data: bytes, what: str, max_bytes: int) -> dict[str, Any]:
    if len(data) > max_bytes:
        raise LimitExceeded(
            f"{what} is {len(data)} bytes, over the {max_bytes} byte limit for image documents"
        )
    try:
        doc = load_json(data)
    except ValueError as exc:
        raise LayerError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise LayerError(f"{what} is not a JSON object")
    return doc


def _descriptor(obj: Any, what: str) -> Descriptor:
    try:
        platform = None
        if isinstance(obj.get("platform"), dict):
            p = obj["platform"]
            platform = Platform(str(p["os"]), str(p["architecture"]), p.get("variant") or None)
        size = obj["size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise LayerError(f"{what}: descriptor size {size!r} is not a non-negative integer")
        return Descriptor(
            media_type=str(obj.get("mediaType", "")),
            digest=Digest.parse(str(obj["digest"])),
            size=size,
            platform=platform,
            urls=tuple(str(u) for u in obj.get("urls") or ()),
            annotations={str(k): str(v) for k, v in (obj.get("annotations") or {}).items()},
        )
    except HypemanError as exc:
        raise LayerError(f"{what}: malformed descriptor: {exc.message}") from exc
    except (KeyError, TypeError, AttributeError) as exc:
        raise LayerError(f"{what}: malformed descriptor ({exc!r})") from exc


def media_type_of(data: bytes, header_type: str | None, max_bytes: int = MAX_DOCUMENT_BYTES) -> str:
    """The manifest's media type: its own ``mediaType`` field, else the HTTP header."""
    doc = _load(data, "manifest", max_bytes)
    inner = doc.get("mediaType")
    if isinstance(inner, str) and inner:
        return inner
    if doc.get("schemaVersion") == 1:
        return DOCKER_SCHEMA1[0]
    if header_type:
        return header_type.split(";")[0].strip()
    # OCI manifests may omit mediaType; tell them apart by shape.
    return OCI_INDEX if "manifests" in doc else OCI_MANIFEST


def parse_manifest_or_index(
    data: bytes, media_type: str, max_bytes: int = MAX_DOCUMENT_BYTES
) -> Manifest | Index:
    """Parse a manifest document of the given media type."""
    if media_type in DOCKER_SCHEMA1:
        raise UnsupportedManifest(
            "this image uses Docker schema 1 manifests, deprecated since 2017 and not supported; "
            "re-push it with a current docker or skopeo to convert it"
        )
    doc = _load(data, "manifest", max_bytes)
    if media_type in INDEX_TYPES:
        manifests = doc.get("manifests")
        if not isinstance(manifests, list):
            raise LayerError("image index has no 'manifests' list")
        return Index(media_type, tuple(_descriptor(m, "image index") for m in manifests))
    if media_type in MANIFEST_TYPES:
        layers = doc.get("layers")
        if not isinstance(layers, list) or "config" not in doc:
            raise LayerError("image manifest lacks 'config' or a 'layers' list")
        return Manifest(
            media_type,
            _descriptor(doc["config"], "manifest config"),
            tuple(_descriptor(layer, f"manifest layer {i}") for i, layer in enumerate(layers)),
        )
    raise UnsupportedManifest(f"unsupported manifest media type {media_type!r}")


def _strings(value: Any, what: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise LayerError(f"image config: {what} must be a list of strings")
    return tuple(value)


def _list(value: Any, what: str) -> list[Any]:
    if not value:
        return []
    if not isinstance(value, list):
        raise LayerError(f"image config: {what} must be a list")
    return value


def _keys(value: Any, what: str) -> list[Any]:
    """The keys of a ``{"80/tcp": {}}`` set; a list is accepted as the set itself."""
    if not value:
        return []
    if not isinstance(value, dict | list):
        raise LayerError(f"image config: {what} must be an object")
    return list(value)


def _optional_string(value: Any, what: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise LayerError(f"image config: {what} must be a string")
    return value


def parse_config(data: bytes, max_bytes: int = MAX_DOCUMENT_BYTES) -> ImageConfig:
    """Parse an image configuration (OCI ``config.md`` / Docker's equivalent)."""
    doc = _load(data, "image config", max_bytes)
    cfg = doc.get("config") or {}
    rootfs = doc.get("rootfs") or {}
    if not isinstance(cfg, dict) or not isinstance(rootfs, dict):
        raise LayerError("image config: 'config' and 'rootfs' must be objects")
    try:
        diff_ids = tuple(Digest.parse(str(d)) for d in _list(rootfs.get("diff_ids"), "diff_ids"))
    except HypemanError as exc:
        raise LayerError(f"image config: malformed rootfs.diff_ids: {exc.message}") from exc
    labels = cfg.get("Labels") or {}
    return ImageConfig(
        architecture=str(doc.get("architecture", "")),
        os=str(doc.get("os", "")),
        variant=_optional_string(doc.get("variant"), "variant"),
        entrypoint=_strings(cfg.get("Entrypoint"), "Entrypoint"),
        cmd=_strings(cfg.get("Cmd"), "Cmd"),
        env=_strings(cfg.get("Env"), "Env") or (),
        working_dir=str(cfg.get("WorkingDir") or ""),
        user=str(cfg.get("User") or ""),
        exposed_ports=tuple(sorted(str(p) for p in _keys(cfg.get("ExposedPorts"), "ExposedPorts"))),
        volumes=tuple(sorted(str(v) for v in _keys(cfg.get("Volumes"), "Volumes"))),
        labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
        stop_signal=_optional_string(cfg.get("StopSignal"), "StopSignal"),
        created=_optional_string(doc.get("created"), "created"),
        diff_ids=diff_ids,
    )
