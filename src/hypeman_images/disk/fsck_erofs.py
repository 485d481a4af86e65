"""Check an EROFS disk with erofs-utils' ``fsck.erofs``, beside its sha256.

Our writer (:mod:`hypeman_images.disk.erofs`) needs no tool to make a disk;
``fsck.erofs`` is a second, independent reader of the format the kernel
mounts (``fs/erofs/erofs_fs.h``). Without ``--extract`` it checks the
superblock and its crc32c, every inode, directory and xattr, and that each
file's blocks lie inside the image, but reads no file data: the sha256
covers those bytes. A build checks its disk when ``fsck.erofs`` is installed
(the disk is then published only if clean); ``verify`` requires it.

The tool runs with only ``PATH`` and ``LC_ALL=C`` from the host, as
:mod:`hypeman_images.disk.e2fsprogs` runs its tools.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from hypeman_images.disk.filehash import FileHash
from hypeman_images.errors import ToolError
from hypeman_images.oci.digest import Digest

FSCK_EROFS = "fsck.erofs"
_SEARCH_DIRS = ("/usr/sbin", "/sbin")
_TAIL_LINES = 15


@dataclass(frozen=True)
class FsckErofs:
    """The ``fsck.erofs`` binary found, and what ``-V`` says of it."""

    path: Path
    version: str


def _env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LC_ALL": "C"}


def find_fsck_erofs(name: str = FSCK_EROFS) -> FsckErofs | None:
    """``fsck.erofs`` on PATH, in /usr/sbin or /sbin; None when erofs-utils is not installed."""
    found = shutil.which(name) or next(
        (p for d in _SEARCH_DIRS if os.access(p := os.path.join(d, name), os.X_OK)), None
    )
    if found is None:
        return None
    proc = _run([found, "-V"])
    words = (proc.stdout + proc.stderr).split()
    return FsckErofs(Path(found), words[1] if len(words) > 1 else "unknown")


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, errors="replace", env=_env(), check=False
        )
    except OSError as exc:
        raise ToolError(f"cannot run {argv[0]}: {exc.strerror}") from exc


def fsck_findings(tool: FsckErofs, image: Path) -> str | None:
    """What ``fsck.erofs`` found in ``image``: ``None`` if it is clean, else
    ``(exit N): <the last lines of its output>``."""
    proc = _run([str(tool.path), str(image)])
    said = (proc.stdout + proc.stderr).strip().splitlines()
    # erofs-utils 1.5 exits 0 after "<E> erofs: failed to verify superblock checksum":
    # an error line counts whatever the exit code (tests/build/test_erofs_store.py).
    if proc.returncode == 0 and not any(line.startswith("<E>") for line in said):
        return None
    return f"(exit {proc.returncode}): " + "\n".join(said[-_TAIL_LINES:])


def sha256_of(path: Path) -> Digest:
    """The file's sha256 (``hashlib.file_digest`` drops the GIL for each slice)."""
    with path.open("rb") as handle:
        return Digest("sha256", hashlib.file_digest(handle, "sha256").hexdigest())


def check_and_hash(
    tool: FsckErofs | None,
    image: Path,
    *,
    compute_sha256: bool,
    hashing: FileHash | None = None,
) -> tuple[Digest | None, str | None]:
    """The sha256 of ``image`` (if asked) and :func:`fsck_findings` (if ``tool``),
    side by side on two cores; the caller judges the findings.

    ``hashing``: a hash of ``image`` already under way (the build's, started on
    the image's head while its writer finished it): it is finished over the
    rest of the file, instead of reading the whole file again.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="fsck.erofs") as pool:
        checked = pool.submit(fsck_findings, tool, image) if tool is not None else None
        try:
            if hashing is not None:
                digest: Digest | None = hashing.digest()
            else:
                digest = sha256_of(image) if compute_sha256 else None
        finally:
            findings = checked.result() if checked is not None else None
    return digest, findings


__all__ = ["FSCK_EROFS", "FsckErofs", "check_and_hash", "find_fsck_erofs", "fsck_findings"]
