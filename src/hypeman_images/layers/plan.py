"""The plan: the merged tree in output order (:class:`Tree`) and what the disk step counts.

Both ways to the disk end in a :class:`Tree`: the two-pass :func:`merge.merge`
plans one from its in-memory tree, and the one pass (:mod:`onepass`) counts
what it wrote with the same :func:`place_node`, :func:`tree_stats` and
:func:`xattr_fixups`, so the two are compared like for like.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from hypeman_images.layers.entries import Entry, Kind
from hypeman_images.layers.xattrs import XattrAction, XattrFixup, xattr_action

log = logging.getLogger(__name__)

BLOCK_SIZE = 4096  # ext4 block size the disk step uses; only for TreeStats
_FAST_SYMLINK_MAX = 59  # ext4 keeps targets shorter than i_block's 60 bytes in the inode


@dataclass(frozen=True)
class TreeStats:
    """What the disk step needs to size the filesystem before mke2fs starts."""

    inodes: int  # directories + distinct non-directory inodes (hard links count once)
    directories: int
    regular_files: int
    regular_bytes: int
    regular_blocks: int  # sum of ceil(size / 4096)
    symlinks: int
    long_symlinks: int  # targets of 60+ bytes need a data block
    hard_links: int  # paths beyond the first of each inode
    directory_entry_bytes: tuple[int, ...]  # per directory, '.' and '..' included
    xattr_bytes: int  # sum of len(name) + len(value) over every kept xattr
    xattr_inodes: int

    def directory_blocks(self, block_size: int = BLOCK_SIZE) -> int:
        """Blocks the directories' linear entries need (no htree index blocks)."""
        return sum(max(1, math.ceil(n / block_size)) for n in self.directory_entry_bytes)


@dataclass(slots=True)  # not frozen: see entries.Entry
class Node:
    """One inode of the final tree, with every path that names it, sorted."""

    paths: tuple[bytes, ...]
    entry: Entry  # kind, metadata, target, device numbers, xattrs (all of them)
    layer: int  # where a regular file's body lives (with entry.ordinal); -1 for dirs

    @property
    def primary(self) -> bytes:
        return self.paths[0]


@dataclass(frozen=True)
class Tree:
    """The merged image, planned in output order. Build it with :func:`merge.merge`.

    ``directories`` are sorted component-wise (parents first) and start with
    the root (``b""``); ``specials`` are symlinks, devices and fifos sorted by
    primary path; ``files`` are regular files ordered by (layer, ordinal),
    the order their bodies appear in the layers.
    """

    directories: tuple[Node, ...]
    specials: tuple[Node, ...]
    files: tuple[Node, ...]
    stats: TreeStats
    xattr_fixups: tuple[XattrFixup, ...]

    def nodes(self) -> dict[bytes, Node]:
        """Every path of the tree (root ``b""``) mapped to its node."""
        out: dict[bytes, Node] = {}
        for node in (*self.directories, *self.specials, *self.files):
            for path in node.paths:
                out[path] = node
        return out


def _round4(n: int) -> int:
    return (n + 3) & ~3


def directory_entry_bytes(names: Iterable[bytes]) -> int:
    """The linear entries of a directory holding ``names``, '.' and '..' included."""
    return 24 + sum(8 + _round4(len(n)) for n in names)


def place_node(node: Node, files: list[Node], specials: list[Node]) -> None:
    """Put a non-directory node among a tree's ``files`` (regular ones) or ``specials``."""
    (files if node.entry.kind is Kind.FILE else specials).append(node)


def tree_stats(
    directories: Sequence[Node],
    specials: Sequence[Node],
    files: Sequence[Node],
    entry_bytes: Sequence[int],
) -> TreeStats:
    """What :class:`Tree` says of its nodes; ``entry_bytes`` per directory, in their order."""
    every = (*directories, *specials, *files)
    kept = [
        [(k, v) for k, v in n.entry.xattrs if xattr_action(k) is not XattrAction.DROP]
        for n in every
        if n.entry.xattrs
    ]
    symlinks = [n for n in specials if n.entry.kind is Kind.SYMLINK]
    return TreeStats(
        inodes=len(every),
        directories=len(directories),
        regular_files=len(files),
        regular_bytes=sum(n.entry.size for n in files),
        regular_blocks=sum(-(-n.entry.size // BLOCK_SIZE) for n in files),
        symlinks=len(symlinks),
        long_symlinks=sum(1 for n in symlinks if len(n.entry.target) > _FAST_SYMLINK_MAX),
        hard_links=sum(len(n.paths) - 1 for n in every),
        directory_entry_bytes=tuple(entry_bytes),
        xattr_bytes=sum(len(k) + len(v) for x in kept for k, v in x),
        xattr_inodes=sum(1 for x in kept if x),
    )


def xattr_fixups(nodes: Iterable[Node], *, say_dropped: bool = True) -> tuple[XattrFixup, ...]:
    """The xattrs of ``nodes`` set after mke2fs (:data:`xattrs.XATTR_POLICY`), sorted by path."""
    out = []
    for node in nodes:
        for name, value in node.entry.xattrs:
            if xattr_action(name) is XattrAction.FIXUP:
                out.append(XattrFixup(b"/" + node.primary, name, value))
            elif say_dropped and xattr_action(name) is XattrAction.DROP:
                log.info("dropping xattr %s of /%r (xattr policy)", name, node.primary)
    return tuple(sorted(out, key=lambda f: (f.path.split(b"/"), f.name)))
