"""The API's bodies as pydantic models: what ``/openapi.json`` documents.

The class names are the schema names in the OpenAPI document
(docs/openapi.json, which ``tests/service/test_api.py`` compares with the
served one).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from hypeman_images.build.image import Image
from hypeman_images.store.formats import DiskFormat
from hypeman_images.store.images import ImageStatus


class CreateImageRequest(BaseModel):
    """Body of ``POST /images``."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Image reference, e.g. `alpine:3.20` or `repo@sha256:…`")
    format: DiskFormat | None = Field(
        default=None,
        description="Extension: the disk's filesystem, `ext4` or `erofs` (default: the "
        "server's, ext4 unless `serve --format`)",
    )


class ImageModel(BaseModel):
    """hypeman's ``Image``."""

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
    tags: list[str] = Field(description="Local tags that point at this digest")
    platform: str | None = Field(description="os/arch[/variant] of the image config")
    format: DiskFormat = Field(description="Extension: the disk's filesystem, ext4 or erofs")


class ErrorModel(BaseModel):
    """Every error response."""

    code: str = Field(description="Stable machine-readable error name, e.g. not_found")
    message: str


class Health(BaseModel):
    """Body of ``GET /healthz``."""

    status: str


def image_model(image: Image) -> ImageModel:
    """The API's view of ``image``."""
    return ImageModel.model_validate(image.to_json())
