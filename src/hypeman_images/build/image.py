"""The :class:`Image` view: a build record as the CLI and the API show it.

metadata.json (:class:`~hypeman_images.store.images.ImageRecord`) is the durable
truth; an :class:`Image` adds what only the running service knows (queue
position, the live status of a build) and hides what does not apply to the
status (no size before ready, no error unless failed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypeman_images.store.formats import DiskFormat
from hypeman_images.store.images import ImageRecord, ImageStatus, StoredImage


@dataclass(frozen=True)
class Image:
    """An image as the CLI and the API show it: its record plus live queue state.

    ``name`` is the canonical reference asked for (or recorded); ``disk`` is
    set only when the image is ready; ``format`` is the disk's filesystem (a
    digest with both disks has an :class:`Image` for each). ``record`` is the
    full metadata.json. ``tags`` are the user's labels (hypeman's meaning of
    the word); ``local_names`` the local tags that point at this digest.
    """

    name: str
    digest: str
    status: ImageStatus
    queue_position: int | None
    error: str | None
    size_bytes: int | None
    entrypoint: list[str] | None
    cmd: list[str] | None
    env: dict[str, str]
    working_dir: str
    user: str
    created_at: str
    repository: str
    tags: dict[str, str]
    local_names: tuple[str, ...]
    platform: str | None
    disk: Path | None
    record: ImageRecord = field(repr=False, compare=False)
    format: DiskFormat = DiskFormat.EXT4

    def source(self) -> dict[str, str | None] | None:
        """Where the ready disk came from (None until ready): ``kind`` ``build`` (made
        here) or ``disk-cache`` (fetched), and for the latter the cache's
        ``repository`` and the disk ``artifact``'s digest, as metadata.json says."""
        if self.status is not ImageStatus.READY:
            return None
        record = self.record
        return {
            "kind": record.source,
            "repository": record.source_repository,
            "artifact": record.source_artifact,
        }

    def to_json(self) -> dict[str, Any]:
        """The API's ``Image``: hypeman's fields, then ``user``, ``local_names``, ``format``,
        ``source``."""
        return {
            "name": self.name,
            "digest": self.digest,
            "status": str(self.status),
            "queue_position": self.queue_position,
            "error": self.error,
            "size_bytes": self.size_bytes,
            "entrypoint": self.entrypoint,
            "cmd": self.cmd,
            "env": self.env,
            "working_dir": self.working_dir,
            "user": self.user,
            "created_at": self.created_at,
            "tags": dict(self.tags),
            "platform": self.platform,
            "local_names": list(self.local_names),
            "format": str(self.format),
            "source": self.source(),
        }


def env_map(env: list[str]) -> dict[str, str]:
    """``["K=V", …]`` as a mapping (a later duplicate wins, as in a process environment)."""
    return dict(item.partition("=")[::2] for item in env)


def image_of(stored: StoredImage, name: str | None = None) -> Image:
    """The :class:`Image` view of a stored record (no queue state)."""
    return image_view(stored.record, stored.repository, stored.tags, stored.directory, name=name)


def image_view(
    record: ImageRecord,
    repository: str,
    local_names: tuple[str, ...],
    directory: Path,
    *,
    name: str | None = None,
    status: ImageStatus | None = None,
    queue_position: int | None = None,
) -> Image:
    """An :class:`Image` of ``record``; ``status`` overrides the record's (a live build)."""
    status = status or record.status
    disk = directory / record.format.disk_name
    return Image(
        name=name or record.name,
        digest=record.digest,
        status=status,
        queue_position=queue_position if status is ImageStatus.PENDING else None,
        error=record.error if status is ImageStatus.FAILED else None,
        size_bytes=record.size_bytes if status is ImageStatus.READY else None,
        entrypoint=record.entrypoint,
        cmd=record.cmd,
        env=env_map(record.env),
        working_dir=record.working_dir,
        user=record.user,
        created_at=record.created_at,
        repository=repository,
        tags=dict(record.tags),
        local_names=local_names,
        platform=record.platform,
        disk=disk if status is ImageStatus.READY and disk.is_file() else None,
        record=record,
        format=record.format,
    )


__all__ = ["Image", "env_map", "image_of", "image_view"]
