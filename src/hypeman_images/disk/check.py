"""Check a finished disk and read back what it holds.

``e2fsck -fn`` must find nothing at all to fix before a disk is published
(:func:`fsck`), and runs beside the disk's sha256 (:func:`check_and_hash`);
:mod:`hypeman_images.disk.verify` repeats both later. The block and inode
counts come from the superblock itself (:func:`superblock_counts`).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hypeman_images.disk.e2fsprogs import E2fsprogs, run_tool, tail
from hypeman_images.errors import ToolError
from hypeman_images.oci.digest import Digest


def _sha256(path: Path) -> Digest:
    # file_digest hashes in 256 KiB slices and hashlib drops the GIL for each, so
    # this runs on one core while e2fsck (a subprocess) runs on the other.
    with path.open("rb") as handle:
        hasher = hashlib.file_digest(handle, "sha256")
    return Digest("sha256", hasher.hexdigest())


def e2fsck_findings(tools: E2fsprogs, image: Path, lines: int) -> str | None:
    """What ``e2fsck -fn`` found in ``image``: ``None`` if nothing at all, else
    ``(exit N): <the last lines of its output>``."""
    proc = run_tool(tools, [str(tools.e2fsck), "-fn", str(image)], what="e2fsck")
    if proc.returncode == 0:
        return None
    return f"(exit {proc.returncode}): {tail(proc.stdout + proc.stderr, lines)}"


def fsck(tools: E2fsprogs, image: Path) -> None:
    """``e2fsck -fn``: must find nothing at all to fix."""
    findings = e2fsck_findings(tools, image, 25)
    if findings is not None:
        raise ToolError(f"e2fsck -fn found problems in the new disk {findings}")


# The primary superblock: 1024 bytes at offset 1024 (kernel.org ext4 "Super Block").
_SB_OFFSET, _SB_SIZE, _SB_MAGIC = 1024, 1024, 0xEF53
_INCOMPAT_64BIT = 0x80


def superblock_counts(image: Path) -> dict[str, int]:
    """``Block count``, ``Free blocks``, ``Inode count``, ``Free inodes``, ``Inodes per group``.

    Read from the primary superblock directly: the same fields dumpe2fs
    prints (``ext2fs_blocks_count`` and friends take the ``_hi`` halves only
    with the 64bit feature), without a process start. e2fsck -fn has checked
    them against the bitmaps by the time they are used.
    """
    with image.open("rb") as handle:
        handle.seek(_SB_OFFSET)
        sb = handle.read(_SB_SIZE)
    if len(sb) < _SB_SIZE or struct.unpack_from("<H", sb, 0x38)[0] != _SB_MAGIC:
        raise ToolError(f"{image.name} has no ext4 superblock")
    inodes, blocks_lo, _, free_lo, free_inodes = struct.unpack_from("<5I", sb, 0)
    (per_group,) = struct.unpack_from("<I", sb, 0x28)
    blocks_hi, _, free_hi = struct.unpack_from("<3I", sb, 0x150)
    if not struct.unpack_from("<I", sb, 0x60)[0] & _INCOMPAT_64BIT:
        blocks_hi = free_hi = 0
    return {
        "Block count": blocks_hi << 32 | blocks_lo,
        "Free blocks": free_hi << 32 | free_lo,
        "Inode count": inodes,
        "Free inodes": free_inodes,
        "Inodes per group": per_group,
    }


def check_and_hash(
    tools: E2fsprogs,
    image: Path,
    compute_sha256: bool,
    check: Callable[[E2fsprogs, Path], None] = fsck,
) -> Digest | None:
    """``check`` (:func:`fsck`) and the sha256 of ``image``, side by side on two cores."""
    if not compute_sha256:
        check(tools, image)
        return None
    with ThreadPoolExecutor(1, thread_name_prefix="e2fsck") as pool:
        checked = pool.submit(check, tools, image)
        try:
            digest = _sha256(image)
        finally:
            checked.result()  # e2fsck's verdict first: a bad disk is the error to report
    return digest
