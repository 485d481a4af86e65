"""The disk artifact's config: what the disk is, how it was built, and how to run it.

One small canonical JSON document (media type ``CONFIG_TYPE``; sorted keys,
no white space, ASCII), so that the same disk and recipe always give the
same config digest::

    {"chunk_size": 67108864, "disk_sha256": "sha256:…", "disk_size": 1234,
     "format": "ext4", "recipe": {…}, "runtime": {…}, "source": "sha256:…"}

``runtime`` carries the image config's run-time fields as ``metadata.json``
records them (:class:`store.images.ImageRecord`), so that a host fetching the
disk needs nothing else to boot it. Parsing is strict: anything malformed or
of an unknown format is :class:`DiskArtifactInvalid`, naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hypeman_images.errors import DiskArtifactInvalid
from hypeman_images.fleet.recipe import (
    DiskFormat,
    Recipe,
    canonical_json,
    parse_digest,
    parse_format,
)
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.wire import load_json
from hypeman_images.store.images import ImageRecord

CONFIG_TYPE = "application/vnd.hypeman.disk.config.v1+json"
MAX_CONFIG_BYTES = 1024 * 1024  # a config is a few KiB; env and labels are its bulk
_LISTS = ("env", "exposed_ports", "volumes")
_OPTIONAL_LISTS = ("entrypoint", "cmd")
_STRINGS = ("working_dir", "user")
_OPTIONAL_STRINGS = ("stop_signal", "platform", "image_created", "config_digest")


def _tuple(value: list[str] | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(value)


def _list(value: tuple[str, ...] | None) -> list[str] | None:
    return None if value is None else list(value)


@dataclass(frozen=True)
class Runtime:
    """How to run what is on the disk: the image config's fields ``metadata.json`` keeps."""

    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    exposed_ports: tuple[str, ...] = ()
    volumes: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    stop_signal: str | None = None
    platform: str | None = None
    image_created: str | None = None
    config_digest: str | None = None

    @classmethod
    def from_record(cls, record: ImageRecord) -> Runtime:
        """The run-time fields of a build's record."""
        return cls(
            entrypoint=_tuple(record.entrypoint),
            cmd=_tuple(record.cmd),
            env=tuple(record.env),
            working_dir=record.working_dir,
            user=record.user,
            exposed_ports=tuple(record.exposed_ports),
            volumes=tuple(record.volumes),
            labels=dict(record.labels),
            stop_signal=record.stop_signal,
            platform=record.platform,
            image_created=record.image_created,
            config_digest=record.config_digest,
        )

    def record_fields(self) -> dict[str, Any]:
        """Keyword arguments for an :class:`ImageRecord` of the fetched disk."""
        doc = self.to_json()
        return {k: v for k, v in doc.items() if k in ImageRecord.__dataclass_fields__}

    def to_json(self) -> dict[str, Any]:
        return {
            "entrypoint": _list(self.entrypoint),
            "cmd": _list(self.cmd),
            "env": list(self.env),
            "working_dir": self.working_dir,
            "user": self.user,
            "exposed_ports": list(self.exposed_ports),
            "volumes": list(self.volumes),
            "labels": dict(self.labels),
            "stop_signal": self.stop_signal,
            "platform": self.platform,
            "image_created": self.image_created,
            "config_digest": self.config_digest,
        }

    @classmethod
    def from_json(cls, doc: Any) -> Runtime:
        """Parse the config's ``runtime`` object, field by field."""
        if not isinstance(doc, dict):
            raise DiskArtifactInvalid("the disk config's runtime is not an object")
        values: dict[str, Any] = {}
        for key in (*_LISTS, *_OPTIONAL_LISTS):
            value = doc.get(key)
            if value is None and key in _OPTIONAL_LISTS:
                values[key] = None
            elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                values[key] = tuple(value)
            else:
                raise DiskArtifactInvalid(f"the disk config's runtime.{key} is not a string list")
        for key in (*_STRINGS, *_OPTIONAL_STRINGS):
            value = doc.get(key)
            if not isinstance(value, str) and not (value is None and key in _OPTIONAL_STRINGS):
                raise DiskArtifactInvalid(f"the disk config's runtime.{key} is not a string")
            values[key] = value
        labels = doc.get("labels")
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise DiskArtifactInvalid("the disk config's runtime.labels is not a string map")
        return cls(labels=dict(labels), **values)


@dataclass(frozen=True)
class DiskConfig:
    """The config of one disk artifact."""

    recipe: Recipe
    runtime: Runtime
    disk_size: int
    disk_sha256: Digest
    chunk_size: int

    @property
    def source(self) -> Digest:
        """The platform manifest the disk was built from (the artifact's subject)."""
        return self.recipe.source

    @property
    def format(self) -> DiskFormat:
        return self.recipe.format

    def to_bytes(self) -> bytes:
        """The canonical JSON of the config: the same config, the same bytes."""
        return canonical_json(
            {
                "chunk_size": self.chunk_size,
                "disk_sha256": str(self.disk_sha256),
                "disk_size": self.disk_size,
                "format": str(self.format),
                "recipe": self.recipe.settings(),
                "runtime": self.runtime.to_json(),
                "source": str(self.source),
            }
        )

    @classmethod
    def parse(cls, data: bytes) -> DiskConfig:
        """Parse a config blob; :class:`DiskArtifactInvalid` says what is wrong with it."""
        if len(data) > MAX_CONFIG_BYTES:
            raise DiskArtifactInvalid(f"the disk config is {len(data)} bytes, over the limit")
        try:
            doc = load_json(data)
        except ValueError as exc:
            raise DiskArtifactInvalid(f"the disk config is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise DiskArtifactInvalid("the disk config is not a JSON object")
        sizes = {k: doc.get(k) for k in ("disk_size", "chunk_size")}
        for key, value in sizes.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise DiskArtifactInvalid(f"the disk config's {key} {value!r} is not positive")
        source = parse_digest(doc.get("source"), "source")
        disk_sha256 = parse_digest(doc.get("disk_sha256"), "disk_sha256")
        if disk_sha256.algorithm != "sha256":
            raise DiskArtifactInvalid(f"the disk config's disk_sha256 is a {disk_sha256.algorithm}")
        recipe = Recipe.from_settings(source, parse_format(doc.get("format")), doc.get("recipe"))
        return cls(
            recipe=recipe,
            runtime=Runtime.from_json(doc.get("runtime")),
            disk_size=doc["disk_size"],
            disk_sha256=disk_sha256,
            chunk_size=doc["chunk_size"],
        )
