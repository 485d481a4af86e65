"""A slow, obviously correct model of OCI layer application (image-spec ``layer.md``).

The state is two maps: path -> inode id, and inode id -> metadata. A hard link
is a second path to the same inode id, so it shares the target's inode *as it
is at that moment*; replacing the target later gives the target path a new
inode and leaves the link's content alone (the case newest-first flatteners
get wrong, go-containerregistry #977).

Per layer, in two phases (``layer.md`` "Whiteouts": whiteouts apply only to
lower layers, never to siblings in the same layer):

1. every ``.wh.<name>`` deletes ``<dir>/<name>`` and its subtree, and every
   ``.wh..wh..opq`` deletes all children of ``<dir>``, from the lower state;
2. every other entry is applied in tar order; a later entry replaces an
   earlier one at the same path. A non-directory replacing a directory drops
   its children; a directory replacing a directory keeps the children and
   takes the new metadata.

A hard link that comes in the tar before the marker that deletes its
lower-layer target still gets that target's inode: docker, containerd and
umoci apply a layer in tar order, so the link is made while its target
exists and the marker removes the target's name only. Phase 1 notes, at each
link, the inode its target has at that point of the tar.

Paths: leading ``./`` and ``/`` are stripped and ``.``/``..`` resolved
lexically; an entry whose path (or hard-link target) climbs above the root
is dropped (a hostile layer must not escape). Then the *directory* part of a
path is resolved through the tree's symlinks the way umoci does it with
``securejoin.SecureJoinVFS``: one component at a time, a symlink's target
replaces it (absolute targets restart at the root, ``..`` pops the last
resolved component and stops at the root), a missing component is kept as
is, more than 255 dereferences is an error; the last component is never
followed. Missing parents are created as ``0755 root:root`` directories with
mtime 0 (docker does the same). A path under an existing non-directory is
ambiguous in the spec, so it raises.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

NodeType = Literal["file", "dir", "symlink", "char", "block", "fifo"]

WHITEOUT_PREFIX = ".wh."
OPAQUE = ".wh..wh..opq"

_TYPES: dict[bytes, NodeType] = {
    tarfile.REGTYPE: "file",
    tarfile.AREGTYPE: "file",
    tarfile.CONTTYPE: "file",
    tarfile.GNUTYPE_SPARSE: "file",  # tarfile expands the holes of every GNU sparse format
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}


@dataclass(frozen=True)
class Node:
    """One path of a file tree, as the oracle and the disk reader both report it.

    ``mode`` is the permission bits incl. setuid/setgid/sticky (``& 0o7777``).
    ``size``/``sha256`` are set for files only, ``target`` for symlinks,
    ``rdev`` (major, minor) for devices. ``inode`` is an opaque id: paths
    with the same id are hard links of each other; compare partitions only.
    """

    type: NodeType
    mode: int
    uid: int = 0
    gid: int = 0
    size: int = 0
    sha256: str | None = None
    target: str | None = None
    rdev: tuple[int, int] | None = None
    xattrs: Mapping[str, bytes] = field(default_factory=dict, hash=False)
    mtime: int = 0
    inode: int = 0


def normalize(name: str) -> str | None:
    """``./a/b/`` -> ``/a/b``; ``None`` when the path climbs above the root."""
    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                return None
            parts.pop()
        else:
            parts.append(part)
    return "/" + "/".join(parts)


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def _child(directory: str, name: str) -> str:
    return directory.rstrip("/") + "/" + name


def _is_under(path: str, directory: str) -> bool:
    """Strictly below ``directory`` (the root is under nothing, not even itself)."""
    return path != directory and path.startswith(directory.rstrip("/") + "/")


class _Tree:
    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self.paths: dict[str, int] = {}
        self.inodes: dict[int, Node] = {}
        self._put("/", Node("dir", 0o755))

    def _put(self, path: str, node: Node) -> None:
        inode = next(self._ids)
        self.inodes[inode] = replace(node, inode=inode)
        self.paths[path] = inode

    def resolve(self, path: str) -> str:
        """securejoin over the tree: ``path`` with every symlink in it followed."""
        todo = path.split("/")
        done = ""  # "" is the root; otherwise "/a/b", free of symlinks
        hops = 0
        while todo:
            part = todo.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                done = done.rsplit("/", 1)[0]
                continue
            inode = self.paths.get(done + "/" + part)
            if inode is not None and self.inodes[inode].type == "symlink":
                hops += 1
                if hops > 255:
                    raise ValueError(f"{path}: too many levels of symbolic links")
                target = self.inodes[inode].target or ""
                if target.startswith("/"):
                    done = ""
                todo = target.split("/") + todo
                continue
            done = done + "/" + part
        return done or "/"

    def real(self, path: str) -> str:
        """Where an entry named ``path`` lands: its directory resolved, its name not."""
        return path if path == "/" else _child(self.resolve(_parent(path)), path.rsplit("/", 1)[1])

    def remove(self, path: str) -> None:
        """Delete ``path`` and everything below it (no-op if absent)."""
        for p in [p for p in self.paths if p == path or _is_under(p, path)]:
            del self.paths[p]

    def remove_children(self, directory: str) -> None:
        for p in [p for p in self.paths if _is_under(p, directory)]:
            del self.paths[p]

    def ensure_dir(self, path: str) -> None:
        if path in self.paths:
            if self.inodes[self.paths[path]].type != "dir":
                raise ValueError(f"{path} is not a directory but has children in a layer")
            return
        self.ensure_dir(_parent(path))
        self._put(path, Node("dir", 0o755))

    def add(self, path: str, node: Node) -> None:
        self.ensure_dir(_parent(path))
        old = self.paths.get(path)
        if old is not None and self.inodes[old].type == "dir" and node.type == "dir":
            self.inodes[old] = replace(node, inode=old)  # keep children, take metadata
            return
        self.remove(path)
        self._put(path, node)

    def link(self, path: str, target: str, deleted: int | None = None) -> None:
        """``deleted``: the inode ``target`` had when the link came, if a later marker
        of the same layer deleted it."""
        inode = self.paths.get(target, deleted)
        if inode is None or self.inodes[inode].type == "dir":
            raise ValueError(f"hard link {path} -> {target}: no such non-directory")
        self.ensure_dir(_parent(path))
        if path != target:
            self.remove(path)
            self.paths[path] = inode

    def result(self) -> dict[str, Node]:
        return {p: self.inodes[i] for p, i in sorted(self.paths.items())}


def _node(member: tarfile.TarInfo, data: bytes) -> Node:
    kind = _TYPES[member.type]
    xattrs = {
        key.removeprefix("SCHILY.xattr."): value.encode("utf-8", "surrogateescape")
        for key, value in member.pax_headers.items()
        if key.startswith("SCHILY.xattr.")
    }
    return Node(
        type=kind,
        mode=member.mode & 0o7777,
        uid=member.uid,
        gid=member.gid,
        size=len(data) if kind == "file" else 0,
        sha256=hashlib.sha256(data).hexdigest() if kind == "file" else None,
        target=member.linkname if kind == "symlink" else None,
        rdev=(member.devmajor, member.devminor) if kind in ("char", "block") else None,
        xattrs=xattrs,
        mtime=int(member.mtime),
    )


def read_tar(data: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    """The members of an uncompressed tar with their contents, in order.

    Names and PAX values are decoded as UTF-8 with ``surrogateescape`` so
    that raw bytes (binary xattrs, non-UTF-8 names) survive a round trip.
    """
    out = []
    with tarfile.open(
        fileobj=io.BytesIO(data), mode="r:", encoding="utf-8", errors="surrogateescape"
    ) as tar:
        for member in tar:
            content = b""
            if member.isreg():
                extracted = tar.extractfile(member)
                assert extracted is not None
                content = extracted.read()
            out.append((member, content))
    return out


def apply_layers(layers: Iterable[bytes]) -> dict[str, Node]:
    """The final tree after applying uncompressed layer tars bottom-up."""
    tree = _Tree()
    for layer in layers:
        members = []
        for member, data in read_tar(layer):
            path = normalize(member.name)
            if path is not None:
                members.append((path, member, data))
        linked: dict[int, tuple[str, int]] = {}  # a link's place in the tar -> its target then
        for place, (path, member, _) in enumerate(members):  # phase 1: whiteouts, lower layers
            base, parent = path.rsplit("/", 1)[1], tree.resolve(_parent(path))
            target = normalize(member.linkname) if member.islnk() else None
            if target is not None and tree.real(target) in tree.paths:
                linked[place] = (tree.real(target), tree.paths[tree.real(target)])
            if base == OPAQUE:
                tree.remove_children(parent)
            elif base.startswith(WHITEOUT_PREFIX):
                name = base[len(WHITEOUT_PREFIX) :]
                if name not in ("", ".", ".."):  # never let a whiteout climb upwards
                    tree.remove(_child(parent, name))
        deleted = {  # the links whose target a later marker deleted
            place: inode for place, (was, inode) in linked.items() if tree.paths.get(was) != inode
        }
        for place, (path, member, data) in enumerate(members):  # phase 2: additions in order
            base = path.rsplit("/", 1)[1]
            if base.startswith(WHITEOUT_PREFIX):
                tree.ensure_dir(tree.resolve(_parent(path)))  # a marker implies its directory
            elif member.islnk():
                target = normalize(member.linkname)
                if target is not None:
                    tree.link(tree.real(path), tree.real(target), deleted.get(place))
            elif member.type in _TYPES and (path != "/" or member.isdir()):
                tree.add(tree.real(path), _node(member, data))
    return tree.result()
