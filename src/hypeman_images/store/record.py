"""An image's record, ``metadata.json``: what a build of one digest is and where it is.

The record is the durable state of a build at every stage (DESIGN.md, "image
store"); :mod:`.images` stores it, :mod:`.housekeeping` recovers from it.
"""

from __future__ import annotations

import enum
import functools
import json
import types
import typing
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from hypeman_images.oci.wire import load_json
from hypeman_images.store.formats import DiskFormat


class ImageStatus(enum.StrEnum):
    """Where a build is: ``pending → pulling → converting → ready | failed``."""

    PENDING = "pending"
    PULLING = "pulling"
    CONVERTING = "converting"
    READY = "ready"
    FAILED = "failed"

    @property
    def active(self) -> bool:
        """True while a build is queued or running."""
        return self in (ImageStatus.PENDING, ImageStatus.PULLING, ImageStatus.CONVERTING)


def now() -> str:
    """The current time as RFC 3339 UTC, as metadata records it."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class ImageRecord:
    """The contents of ``metadata.json``: one image digest of one repository.

    ``tags`` are the user's labels (hypeman's ``Tags``: key/value pairs given
    when the image was asked for), not the image config's ``labels`` and not
    the local tag names, which are the tag links (``StoredImage.tags``).
    ``borrowed_credentials``: the build was asked for with credentials that
    only its request held, so a crash cannot resume its pull
    (:func:`~hypeman_images.build.maintenance.recover_builds`).
    """

    name: str
    digest: str
    status: ImageStatus
    created_at: str
    error: str | None = None
    size_bytes: int | None = None
    content_bytes: int | None = None
    disk_sha256: str | None = None
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    env: list[str] = field(default_factory=list)
    working_dir: str = ""
    user: str = ""
    exposed_ports: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    stop_signal: str | None = None
    platform: str | None = None
    config_digest: str | None = None
    manifest_media_type: str | None = None
    layers: list[str] = field(default_factory=list)
    image_created: str | None = None
    tool_versions: dict[str, str] = field(default_factory=dict)
    # The rest of the disk's recipe (docs/disk-artifacts.md, "Recipes"): the code
    # that flattened the layers, the build path taken, other byte-changing options.
    builder: str | None = None
    one_pass: bool | None = None
    disk_options: dict[str, str] = field(default_factory=dict)
    # Where the disk came from: "build" (made here) or "disk-cache" (fetched and
    # verified: the artifact's digest and the repository it came from).
    source: str = "build"
    source_artifact: str | None = None
    source_repository: str | None = None
    free_space_bytes: int | None = None
    index_digest: str | None = None
    updated_at: str | None = None
    # Tags besides ``name`` that asked for this digest while it was being built,
    # so that a build recovered after a crash sets them too; cleared once set.
    pending_tags: list[str] = field(default_factory=list)
    # The process that wrote a queued or running status (fsutil.process_id), so that
    # others tell a build waiting in a live process from one whose process died.
    writer: str | None = None
    # The disk this record is of; its file names follow (store.formats).
    format: DiskFormat = DiskFormat.EXT4
    tags: dict[str, str] = field(default_factory=dict)
    borrowed_credentials: bool = False

    def to_json(self) -> bytes:
        """Canonical JSON bytes for metadata.json."""
        doc = asdict(self)
        doc["status"] = str(self.status)
        doc["format"] = str(self.format)
        return json.dumps(doc, indent=2, sort_keys=False).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> ImageRecord:
        """Parse metadata.json, ignoring fields a newer version may have added.

        Every known field must have its declared type: a record that does not
        is refused here (``ValueError``), once, rather than failing whoever
        reads the field later (tests/store/test_images.py, corrupt records).
        A ``tags`` list is the key's older meaning, the local tag names: those
        are the tag links, so it reads as no labels, and the record is used as
        it is (no rewrite, no rebuild; tests/store/test_images.py).
        """
        doc = load_json(data)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        if isinstance(doc.get("tags"), list):
            del doc["tags"]
        hints = _field_types()
        doc = {k: v for k, v in doc.items() if k in hints}
        for name, hint in hints.items():
            if name in doc and not _has_type(doc[name], hint):
                raise ValueError(f"field {name!r} is not {getattr(hint, '__name__', hint)}")
        doc["status"] = ImageStatus(doc["status"])
        doc["format"] = DiskFormat(doc.get("format", DiskFormat.EXT4))  # absent: before erofs
        return cls(**doc)

    def evolve(self, **changes: Any) -> ImageRecord:
        """A copy with ``changes`` and a fresh ``updated_at``."""
        return replace(self, updated_at=now(), **changes)


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(ImageRecord)


def _has_type(value: object, hint: Any) -> bool:
    """Is decoded JSON ``value`` of the field type ``hint`` (str, int, lists, dicts, unions)?"""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_has_type(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint in (ImageStatus, DiskFormat):
        return isinstance(value, str)  # its value is checked when the enum is made
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(_has_type(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            _has_type(k, args[0]) and _has_type(v, args[1]) for k, v in value.items()
        )
    return isinstance(hint, type) and isinstance(value, hint)


__all__ = ["ImageRecord", "ImageStatus", "now"]
