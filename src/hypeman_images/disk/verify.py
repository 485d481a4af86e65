"""Check a built disk again: ``e2fsck -fn``, and its sha256 against the one recorded.

Every disk passed ``e2fsck -fn`` before it was published; its sha256 is in
``metadata.json`` unless it was built with ``--no-disk-digest``. A
verification repeats the check, hashes the disk, compares the result with the
recorded sha256 if there is one, and can record it for a disk built without
(the first verification then sets what the next ones compare with). The
check and the hash run side by side, as at build time. An EROFS disk is
checked the same way with ``fsck.erofs`` (:func:`check_erofs_disk`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hypeman_images.disk.check import check_and_hash, e2fsck_findings
from hypeman_images.disk.e2fsprogs import E2fsprogs
from hypeman_images.disk.fsck_erofs import check_and_hash as check_and_hash_erofs
from hypeman_images.disk.fsck_erofs import find_fsck_erofs
from hypeman_images.errors import CorruptDisk, ToolError
from hypeman_images.oci.digest import Digest


@dataclass(frozen=True)
class Verified:
    """A disk that passed: its sha256 now, and how it compares with the record."""

    name: str
    digest: str  # the image's (manifest) digest
    disk: Path
    sha256: str
    recorded: str | None  # what metadata.json held before this check (equal to sha256 if set)
    recorded_now: bool = False  # this check wrote sha256 into metadata.json
    format: str = "ext4"  # the disk's filesystem: ext4 (e2fsck -fn) or erofs (fsck.erofs)


def check_disk(tools: E2fsprogs, disk: Path, expected: str | None) -> Digest:
    """``e2fsck -fn`` and the sha256 of ``disk``; :class:`CorruptDisk` if either fails.

    ``expected`` is the recorded ``sha256:<hex>``, if any.
    """
    digest = check_and_hash(tools, disk, compute_sha256=True, check=_fsck_clean)
    assert digest is not None
    return _compare(disk, digest, expected)


def check_erofs_disk(disk: Path, expected: str | None) -> Digest:
    """``fsck.erofs`` and the sha256 of an EROFS ``disk``; :class:`CorruptDisk` if either fails.

    Raises :class:`ToolError` when erofs-utils is not installed.
    """
    tool = find_fsck_erofs()
    if tool is None:
        raise ToolError("fsck.erofs not found on PATH: install erofs-utils to verify EROFS disks")
    digest, findings = check_and_hash_erofs(tool, disk, compute_sha256=True)
    if findings is not None:
        raise CorruptDisk(
            f"{disk}: fsck.erofs found problems {findings}; remove the image and pull it again"
        )
    assert digest is not None
    return _compare(disk, digest, expected)


def _compare(disk: Path, digest: Digest, expected: str | None) -> Digest:
    if expected is not None and str(digest) != expected:
        raise CorruptDisk(
            f"{disk} hashes to {digest}, not to the {expected} recorded when it was built: "
            "it changed since; remove the image and pull it again"
        )
    return digest


def _fsck_clean(tools: E2fsprogs, disk: Path) -> None:
    # check.fsck's ToolError means a build went wrong; here the disk changed since.
    findings = e2fsck_findings(tools, disk, 15)
    if findings is not None:
        raise CorruptDisk(
            f"{disk}: e2fsck -fn found problems {findings}; remove the image and pull it again"
        )
