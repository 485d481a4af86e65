"""The disk formats a build makes, and the files each keeps in a digest directory.

One digest directory may hold a disk of each format side by side, each with
a record of its own (docs/design.md, "EROFS disks")::

    <digest-hex>/rootfs.ext4    metadata.json          ext4 (records without "format" are ext4)
    <digest-hex>/rootfs.erofs   metadata.erofs.json    EROFS

The ext4 record keeps the name it always had, so a data dir written before
EROFS disks existed reads unchanged.
"""

from __future__ import annotations

import enum

from hypeman_images.errors import InvalidArgument


class DiskFormat(enum.StrEnum):
    """The filesystem of a disk: ``ext4`` (the default) or ``erofs`` (read-only)."""

    EXT4 = "ext4"
    EROFS = "erofs"

    @property
    def disk_name(self) -> str:
        """The disk's file name: ``rootfs.ext4``, ``rootfs.erofs``."""
        return f"rootfs.{self.value}"

    @property
    def metadata_name(self) -> str:
        """The record's file name: ``metadata.json`` (ext4), ``metadata.erofs.json``."""
        return "metadata.json" if self is DiskFormat.EXT4 else f"metadata.{self.value}.json"

    @classmethod
    def parse(cls, text: str) -> DiskFormat:
        """The format named ``text``; :class:`InvalidArgument` for any other."""
        try:
            return cls(text)
        except ValueError:
            names = ", ".join(f.value for f in cls)
            raise InvalidArgument(f"unknown disk format {text!r}: use one of {names}") from None


#: The files of a digest directory that records and disks own (gc and recovery keep them).
RECORD_FILES = frozenset(n for f in DiskFormat for n in (f.disk_name, f.metadata_name))

__all__ = ["RECORD_FILES", "DiskFormat"]
