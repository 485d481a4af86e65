"""The API's bodies as pydantic models: what ``/openapi.json`` documents.

The class names are the schema names in the OpenAPI document
(docs/openapi.json, which ``tests/service/test_api.py`` compares with the
served one). Field names and meanings are hypeman's (its OpenAPI document:
``CreateImageRequest``, ``PushCredentials``, ``Image``, ``Tags``,
``CapabilitiesImages``); ``user`` and ``local_names`` are ours, added beside them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from hypeman_images.build.image import Image
from hypeman_images.registry.credentials import Credential
from hypeman_images.store.formats import DiskFormat
from hypeman_images.store.images import ImageStatus

_TAGS = (
    "User-defined key-value tags (hypeman's `Tags`): at most 50, keys of 1-128 and values "
    "of up to 256 characters of letters, digits, space and `_.:/=+@-`."
)


class PushCredentials(BaseModel):
    """Registry credentials borrowed for one pull: kept in memory only, never stored or logged.

    Omitted or empty, the server's own registry credentials are used.
    """

    model_config = ConfigDict(extra="forbid")
    username: str | None = Field(default=None, description="Registry username")
    password: SecretStr | None = Field(
        default=None, description="Registry password or access token"
    )
    registry_token: SecretStr | None = Field(
        default=None, description="Bearer token for an Authorization header"
    )

    def credential(self) -> Credential:
        """The library's borrowed :class:`Credential` of these."""
        return Credential(
            username=self.username or "",
            password=self.password.get_secret_value() if self.password else "",
            registry_token=self.registry_token.get_secret_value() if self.registry_token else "",
            borrowed=True,
        )


class CreateImageRequest(BaseModel):
    """Body of ``POST /images``."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Image reference, e.g. `alpine:3.20` or `repo@sha256:…`")
    credentials: PushCredentials | None = None
    platform: str | None = Field(
        default=None,
        description=(
            "Target platform as os/arch[/variant] (e.g. `linux/amd64`), or another form "
            "`docker --platform` takes (`arm64`, `linux/arm64/v8`). Omit for the server's "
            "default platform. Invalid values (and OSes other than linux) are 400 "
            "`invalid_platform`."
        ),
    )
    tags: dict[str, str] | None = Field(
        default=None, description=_TAGS + " Given, they replace the image's."
    )
    format: DiskFormat | None = Field(
        default=None,
        description="Extension: the disk's filesystem, `ext4` or `erofs` (default: the "
        "server's, ext4 unless `serve --format`)",
    )


class TagImageRequest(BaseModel):
    """Body of ``POST /images/{name}/tag``."""

    model_config = ConfigDict(extra="forbid")
    target: str = Field(
        description="Target reference with a tag; it points at the source image, no pull"
    )


class ImageSource(BaseModel):
    """Where a ready disk came from: built here, or fetched from the disk cache."""

    kind: Literal["build", "disk-cache"] = Field(
        description="`build`: made on this host; `disk-cache`: fetched from the disk cache "
        'and verified (docs/configuration.md, "The disk cache")'
    )
    repository: str | None = Field(description="The disk cache's repository (`disk-cache` only)")
    artifact: str | None = Field(
        description="The disk artifact's manifest digest, sha256:… (`disk-cache` only)"
    )


class ImageModel(BaseModel):
    """hypeman's ``Image``, with ``user``, ``local_names``, ``format`` and ``source`` besides."""

    name: str = Field(description="Normalised reference, e.g. docker.io/library/alpine:3.20")
    digest: str = Field(description="Platform manifest digest (sha256:…)")
    status: ImageStatus
    queue_position: int | None = Field(description="1-based place in the queue while pending")
    error: str | None = Field(description="Why the build failed (status failed)")
    size_bytes: int | None = Field(description="Size of rootfs.ext4 (status ready)")
    entrypoint: list[str] | None
    cmd: list[str] | None
    env: dict[str, str]
    working_dir: str
    user: str
    created_at: str = Field(description="RFC 3339 UTC")
    tags: dict[str, str] = Field(description=_TAGS)
    platform: str | None = Field(description="os/arch[/variant] of the image config")
    local_names: list[str] = Field(description="Local tags that point at this digest")
    format: DiskFormat = Field(description="Extension: the disk's filesystem, ext4 or erofs")
    source: ImageSource | None = Field(
        description="Extension: where the disk came from (null until the image is ready)"
    )


class ErrorDetail(BaseModel):
    """One of several problems (hypeman's ``ErrorDetail``)."""

    code: str
    message: str


class ErrorModel(BaseModel):
    """Every error response (hypeman's ``Error``)."""

    code: str = Field(description="Stable machine-readable error name, e.g. not_found")
    message: str
    details: list[ErrorDetail] | None = None


class Health(BaseModel):
    """Body of ``GET /healthz``."""

    status: str


class CapabilitiesServer(BaseModel):
    """hypeman's ``CapabilitiesServer``."""

    version: str = Field(description="Server version")
    api_version: str = Field(description="API contract version (the OpenAPI info version)")


class CapabilitiesHost(BaseModel):
    """hypeman's ``CapabilitiesHost``."""

    os: str
    arch: str


class CapabilitiesImages(BaseModel):
    """hypeman's ``CapabilitiesImages``."""

    default_platform: str = Field(description="Image platform used when a request names none")
    platforms: list[str] = Field(description="Image platforms (os/arch) this host can run")


class CapabilitiesRuntime(BaseModel):
    """hypeman's ``CapabilitiesRuntime`` (never listed here)."""

    name: str
    available: bool
    features: list[str]


class Capabilities(BaseModel):
    """The part of hypeman's ``Capabilities`` an image service has: no runtimes, no network."""

    server: CapabilitiesServer
    host: CapabilitiesHost
    images: CapabilitiesImages
    features: list[str] = Field(description="Server-level feature IDs: `images`")
    runtimes: list[CapabilitiesRuntime] = Field(description="None: this server runs no VMs")


def image_model(image: Image) -> ImageModel:
    """The API's view of ``image``."""
    return ImageModel.model_validate(image.to_json())
