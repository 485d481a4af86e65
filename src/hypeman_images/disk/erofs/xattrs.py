"""Extended attributes: name-prefix indexes, the shared area, inline bodies.

An xattr is stored as ``struct erofs_xattr_entry`` whose ``e_name_index``
names a prefix and whose name is only the rest (``fs/erofs/erofs_fs.h``,
"Name indexes"). A (name, value) pair that two or more inodes carry is
written once to the shared xattr area and referenced from each inode's
``struct erofs_xattr_ibody_header`` by a 4-byte id (its offset from
``xattr_blkaddr`` in 4-byte units); the others are inline, after the header.
Names outside these prefixes have no index and cannot be stored: the kernel
has no handler for them (Linux refuses such names anyway).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from hypeman_images.disk.erofs.format import (
    BLOCK_SIZE,
    XATTR_IBODY_HEADER,
    XATTR_ICOUNT_MAX,
    XATTR_SHARED_MAX,
    pack_ibody_header,
    pack_xattr_entry,
)
from hypeman_images.disk.erofs.model import ErofsInputError, Xattrs

# (prefix, e_name_index, whole): a whole name is the prefix alone (the ACLs).
PREFIXES: tuple[tuple[bytes, int, bool], ...] = (
    (b"user.", 1, False),  # EROFS_XATTR_INDEX_USER
    (b"system.posix_acl_access", 2, True),  # EROFS_XATTR_INDEX_POSIX_ACL_ACCESS
    (b"system.posix_acl_default", 3, True),  # EROFS_XATTR_INDEX_POSIX_ACL_DEFAULT
    (b"trusted.", 4, False),  # EROFS_XATTR_INDEX_TRUSTED
    (b"security.", 6, False),  # EROFS_XATTR_INDEX_SECURITY
)

# One stored xattr: (e_name_index, name without the prefix, value).
Stored = tuple[int, bytes, bytes]


def split_name(name: bytes, where: str) -> tuple[int, bytes]:
    """``(e_name_index, suffix)`` for a full xattr name; refuses names with no index.

    A name is at most 255 bytes with its prefix (``XATTR_NAME_MAX``): longer
    ones could be stored but never read back through ``getxattr(2)``.
    """
    if len(name) > 255:
        raise ErofsInputError(f"{where}: xattr name {name[:40]!r}... over 255 bytes")
    for prefix, index, whole in PREFIXES:
        if whole and name == prefix:
            return index, b""
        if not whole and name.startswith(prefix) and len(name) > len(prefix):
            return index, name[len(prefix) :]
    raise ErofsInputError(
        f"{where}: xattr {name!r} has no EROFS name index "
        "(user., trusted., security., system.posix_acl_*) or an empty suffix"
    )


def stored(xattrs: Xattrs, where: str) -> tuple[Stored, ...]:
    """An entry's xattrs as stored, in a canonical order (index, then name)."""
    return tuple(sorted((*split_name(name, where), value) for name, value in xattrs))


def entry_size(item: Stored) -> int:
    """The bytes of one ``struct erofs_xattr_entry`` with name and value, padded."""
    return -(-(4 + len(item[1]) + len(item[2])) // 4) * 4


class SharedXattrs:
    """The shared xattr area: pairs that more than one inode carries.

    Feed it every inode's xattrs with :meth:`count`, then :meth:`seal` it;
    :meth:`ibody` then gives each inode's inline xattr body. An entry never
    crosses a block boundary (it moves to the next block instead), so a
    reader that maps one block at a time sees it whole.
    """

    def __init__(self) -> None:
        self._counts: Counter[Stored] = Counter()
        self._ids: dict[Stored, int] = {}
        self.area = b""

    def count(self, items: Iterable[Stored]) -> None:
        """Note one inode's xattrs."""
        self._counts.update(items)

    def seal(self) -> None:
        """Choose the shared pairs and lay out the area (sorted: reproducible)."""
        area = bytearray()
        for item in sorted(item for item, n in self._counts.items() if n > 1):
            raw = pack_xattr_entry(*item)
            if len(area) % BLOCK_SIZE + len(raw) > BLOCK_SIZE and len(raw) <= BLOCK_SIZE:
                area += bytes(-len(area) % BLOCK_SIZE)
            self._ids[item] = len(area) // 4
            area += raw
        self.area = bytes(area)
        self._counts.clear()

    def ibody_size(self, items: tuple[Stored, ...]) -> int:
        """The bytes of the inline xattr body for ``items`` (0 when there are none)."""
        if not items:
            return 0
        shared = sum(1 for item in items if item in self._ids)
        shared = min(shared, XATTR_SHARED_MAX)
        inline = self._inline(items, shared)
        return XATTR_IBODY_HEADER + 4 * shared + sum(entry_size(i) for i in inline)

    def ibody(self, items: tuple[Stored, ...], where: str) -> tuple[int, bytes]:
        """``(i_xattr_icount, body)``: the header, shared ids, then the inline entries."""
        if not items:
            return 0, b""
        ids = [self._ids[i] for i in items if i in self._ids][:XATTR_SHARED_MAX]
        inline = self._inline(items, len(ids))
        body = b"".join(
            [pack_ibody_header(len(ids)), *(i.to_bytes(4, "little") for i in ids)]
            + [pack_xattr_entry(*i) for i in inline]
        )
        icount = 1 + (len(body) - XATTR_IBODY_HEADER) // 4
        if icount > XATTR_ICOUNT_MAX:
            raise ErofsInputError(f"{where}: xattrs take more than i_xattr_icount can count")
        return icount, body

    def _inline(self, items: tuple[Stored, ...], shared: int) -> list[Stored]:
        """The items not referenced by a shared id (past 255 ids, the rest stay inline)."""
        out: list[Stored] = []
        taken = 0
        for item in items:
            if item in self._ids and taken < shared:
                taken += 1
            else:
                out.append(item)
        return out


def worst_ibody_size(items: tuple[Stored, ...]) -> int:
    """An upper bound of :meth:`SharedXattrs.ibody_size`, before sharing is known."""
    if not items:
        return 0
    return XATTR_IBODY_HEADER + sum(entry_size(i) for i in items)
