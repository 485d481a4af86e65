"""What the EROFS writer takes: one :class:`Entry` per path, parents first.

The model is the writer's own (``disk`` may not import ``layers``). The
merged tree of ``layers.plan`` maps onto it in one small function in
``build``: each ``Node`` of ``tree.directories`` (root first), then of
``tree.specials`` and ``tree.files`` (the files in layer order, each with a
bounded reader over its body in the layer stream), gives an :class:`Entry`
for its primary path (``Kind`` values match by name; ``LINK`` becomes
``HARDLINK``; xattr names are encoded with ``os.fsencode``; a sparse
member's map is ``sparse``), followed by a ``HARDLINK`` entry for each other
path of the node. :func:`check_entry` refuses what the format cannot hold,
with :class:`ErofsInputError`; limits on sizes and counts are the caller's.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from hypeman_images.disk.erofs.format import NAME_MAX, U32_MAX, XATTR_VALUE_MAX
from hypeman_images.errors import LayerError

# A sparse file's data fragments: (offset, length), ascending and disjoint; the
# rest of the file reads as zeros. The body then carries only the fragments'
# bytes, one after another (as GNU tar's sparse members do).
SparseMap = tuple[tuple[int, int], ...]
Xattrs = tuple[tuple[bytes, bytes], ...]

_MAX_MAJOR, _MAX_MINOR = (1 << 12) - 1, (1 << 20) - 1  # the kernel's dev_t (new_encode_dev)
_I64 = 1 << 63
MAX_FILE_SIZE = 1 << 44  # 2**32 blocks of 4 KiB: the most a __le32 block address reaches
MAX_SYMLINK = 4095  # PATH_MAX less the NUL: what readlink(2) can return


class ErofsInputError(LayerError):
    """An entry the EROFS format cannot hold, or a tree that is not a tree."""


class Kind(enum.Enum):
    """What an entry is; ``HARDLINK`` names an earlier non-directory by path."""

    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"
    SOCKET = "socket"
    HARDLINK = "hardlink"


@dataclass(frozen=True, slots=True)
class Entry:
    """One path of the image.

    ``path`` is relative to the root, components joined by ``/``, ``b""`` for
    the root itself (which must come first). ``mode`` holds the permission
    bits only (``0o7777``); the kind gives the file type. ``size`` is a
    regular file's length, holes included. ``target`` is a symlink's target,
    or for ``HARDLINK`` the path of the inode it names (whose metadata wins:
    a hard link's own fields are ignored). ``xattrs`` are full names
    (``b"user.foo"``) with their values. ``sparse`` marks a regular file whose
    body holds only these fragments' bytes.
    """

    path: bytes
    kind: Kind
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    mtime_nsec: int = 0
    size: int = 0
    target: bytes = b""
    devmajor: int = 0
    devminor: int = 0
    xattrs: Xattrs = ()
    sparse: SparseMap | None = None


def split_path(path: bytes) -> tuple[bytes, bytes]:
    """``(parent, name)`` of a non-root path; refuses names the format cannot hold."""
    parent, _, name = path.rpartition(b"/")
    if not name or name in (b".", b"..") or b"\0" in name or len(name) > NAME_MAX:
        raise ErofsInputError(f"erofs: {path!r}: not a valid name (1..255 bytes, no NUL or '/')")
    return parent, name


def check_entry(entry: Entry) -> None:
    """Refuse an entry whose fields the on-disk format cannot represent."""
    where = f"erofs: {entry.path!r}"
    if entry.mode & ~0o7777 or entry.mode < 0:
        raise ErofsInputError(f"{where}: mode {entry.mode:o} has bits beyond 07777")
    if not (0 <= entry.uid <= U32_MAX and 0 <= entry.gid <= U32_MAX):
        raise ErofsInputError(f"{where}: uid/gid {entry.uid}/{entry.gid} beyond 32 bits")
    if not (-_I64 <= entry.mtime < _I64 and 0 <= entry.mtime_nsec < 10**9):
        raise ErofsInputError(f"{where}: mtime {entry.mtime}.{entry.mtime_nsec} out of range")
    if entry.kind is Kind.FILE:
        _check_file(entry, where)
    elif entry.kind is Kind.SYMLINK and not 0 < len(entry.target) <= MAX_SYMLINK:
        raise ErofsInputError(f"{where}: a symlink target must be 1..4095 bytes")
    elif entry.kind is Kind.SYMLINK and b"\0" in entry.target:
        raise ErofsInputError(f"{where}: a symlink target cannot hold NUL")
    elif entry.kind in (Kind.CHAR, Kind.BLOCK) and not (
        0 <= entry.devmajor <= _MAX_MAJOR and 0 <= entry.devminor <= _MAX_MINOR
    ):
        raise ErofsInputError(f"{where}: device {entry.devmajor}:{entry.devminor} too large")
    for name, value in entry.xattrs:
        if len(value) > XATTR_VALUE_MAX:
            raise ErofsInputError(f"{where}: xattr {name!r} value over 65535 bytes")
    if len({name for name, _ in entry.xattrs}) != len(entry.xattrs):
        raise ErofsInputError(f"{where}: an xattr name appears twice")


def _check_file(entry: Entry, where: str) -> None:
    if not 0 <= entry.size <= MAX_FILE_SIZE:
        raise ErofsInputError(f"{where}: size {entry.size} beyond 16 TiB")
    if entry.sparse is None:
        return
    end = 0
    for offset, length in entry.sparse:
        if offset < end or length < 0 or offset + length > entry.size:
            raise ErofsInputError(f"{where}: sparse map not ascending, disjoint, within size")
        end = offset + length


def body_size(entry: Entry) -> int:
    """How many bytes a regular file's body must deliver."""
    if entry.sparse is None:
        return entry.size
    return sum(length for _, length in entry.sparse)
