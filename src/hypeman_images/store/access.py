"""Who may read the data dir: its owner, or its owner and one group; never everybody.

The data dir holds layers and disks pulled with private credentials, so it is
as private as they are (docs/security.md, "Who can read the data dir"):

- a data dir made here is mode 0700; with a group (``--data-dir-group``,
  ``$HYPEMAN_DATA_DIR_GROUP``) it belongs to that group and is 2750, the
  setgid bit making what is created inside belong to the group too;
- files made inside are never readable by others (:data:`FILE_MODE`,
  :data:`BLOB_MODE`); the group bits only count where the dir lets the group in;
- a data dir that exists is left as it is, unless a group is asked for (then
  it gets the group and 2750, if we own it): access is not taken away
  behind the admin's back; :func:`exposure` says what ``serve`` warns about.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from hypeman_images.errors import StorageError
from hypeman_images.fsutil import FILE_MODE

PRIVATE_MODE = 0o700
GROUP_MODE = 0o2750
# Content-addressed blobs: read-only, for the same two.
BLOB_MODE = 0o440


def prepare_data_dir(root: Path, group: int | None = None) -> None:
    """Create ``root`` private (0700), or shared with ``group`` (2750); check one that exists.

    Raises :class:`StorageError` if it cannot be made or given the group.
    """
    try:
        if not root.is_dir():
            root.parent.mkdir(parents=True, exist_ok=True)
            try:
                root.mkdir(mode=PRIVATE_MODE)
            except FileExistsError:
                pass  # made meanwhile by another process: checked below like any other
            else:
                os.chmod(root, PRIVATE_MODE)  # mkdir's mode is filtered by the umask
        if group is not None:
            _share(root, group)
    except OSError as exc:
        raise StorageError(f"cannot prepare the data dir {root}: {exc.strerror or exc}") from exc


def exposure(root: Path) -> str | None:
    """A warning if every user may enter ``root`` (made so before, or by hand); else None."""
    try:
        mode = stat.S_IMODE(root.stat().st_mode)
    except OSError:
        return None
    if not mode & stat.S_IRWXO:
        return None
    return (
        f"the data dir {root} is open to every user (mode {mode:04o}), and its layers and "
        f"disks may come from private registries; run: chmod o-rwx {root}"
    )


def _share(root: Path, group: int) -> None:
    info = root.stat()
    if info.st_gid == group and stat.S_IMODE(info.st_mode) == GROUP_MODE:
        return
    if info.st_uid != os.geteuid():
        raise PermissionError(
            0, f"it belongs to uid {info.st_uid}, so only its owner can give it group {group}"
        )
    os.chown(root, -1, group)
    os.chmod(root, GROUP_MODE)


__all__ = ["BLOB_MODE", "FILE_MODE", "GROUP_MODE", "PRIVATE_MODE", "exposure", "prepare_data_dir"]
