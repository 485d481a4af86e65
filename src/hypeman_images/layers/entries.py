"""What pass 1 records of a layer: an :class:`Entry` per header, a :class:`LayerScan` per layer.

Headers only, never a body: a regular file's body is found again on the way
out by the ``offset`` recorded with it (:mod:`emit`). An entry's path is
already safe (:func:`paths.clean_path`); whiteouts and opaque markers are
entries of their own kinds.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from hypeman_images.errors import LayerError
from hypeman_images.layers.tar import BLOCKDEV, CHAR, DIRECTORY, FIFO, HARDLINK, REGULAR, SYMLINK
from hypeman_images.layers.tarsparse import SparseMap
from hypeman_images.layers.xattrs import Xattrs
from hypeman_images.oci.digest import Digest


class Kind(enum.Enum):
    """What an entry is. ``WHITEOUT``/``OPAQUE`` are recognised by name alone."""

    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    LINK = "hardlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"
    WHITEOUT = "whiteout"
    OPAQUE = "opaque"


# The kinds a tar type flag stands for, and back (scan reads them, emit writes them).
KIND_OF_TYPEFLAG = {
    REGULAR: Kind.FILE,
    DIRECTORY: Kind.DIR,
    SYMLINK: Kind.SYMLINK,
    HARDLINK: Kind.LINK,
    CHAR: Kind.CHAR,
    BLOCKDEV: Kind.BLOCK,
    FIFO: Kind.FIFO,
}
TYPEFLAG_OF_KIND = {kind: flag for flag, kind in KIND_OF_TYPEFLAG.items()}


# Not frozen, though never changed once made: one is made per tar entry, and a
# frozen dataclass's __init__ costs several times as much (it sets each field
# through object.__setattr__).
@dataclass(slots=True)
class Entry:
    """One header of a layer, its path made safe; read-only by convention.

    ``path`` is relative to the root without a leading ``/`` (``b""`` is the
    root). ``target`` is the raw symlink target, or the cleaned path a hard
    link names. For ``WHITEOUT``, ``path`` is the path to delete; for
    ``OPAQUE``, the directory whose lower contents to hide.
    """

    ordinal: int
    path: bytes
    kind: Kind
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    size: int = 0
    target: bytes = b""
    devmajor: int = 0
    devminor: int = 0
    xattrs: Xattrs = ()
    offset: int = 0  # a regular file's body in the uncompressed layer (Header.offset)


@dataclass(slots=True)
class SparseEntry(Entry):
    """A regular file stored sparse (GNU tar ``--sparse``): ``size`` is its real size.

    A subclass, not a field of :class:`Entry`, so the ordinary entries of a
    layer carry no extra slot. ``sparse`` is :attr:`tarheader.Header.sparse`.
    """

    sparse: SparseMap = ()


def sparse_map(entry: Entry) -> SparseMap | None:
    """The data fragments of a sparse file's entry; ``None`` for any other entry."""
    return entry.sparse if isinstance(entry, SparseEntry) else None


@dataclass(frozen=True)
class LayerScan:
    """What pass 1 learnt of one layer: its headers, size and diff_id."""

    index: int
    name: str
    diff_id: Digest
    size: int
    entries: tuple[Entry, ...]

    def check_diff_id(self, expected: Digest) -> None:
        """Raise :class:`LayerError` unless the uncompressed bytes hash to ``expected``."""
        if self.diff_id != expected:
            raise LayerError(
                f"layer {self.index} ({self.name}): uncompressed content hashes to "
                f"{self.diff_id}, but the image config's rootfs.diff_ids says {expected}"
            )
