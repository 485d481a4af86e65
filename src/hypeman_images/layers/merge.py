"""Pass 2: apply the scans bottom-up with the OCI layer semantics, then plan the output.

:func:`merge` (or :class:`Merger`, a layer at a time) applies the scans
(image-spec ``layer.md``) to an in-memory tree whose non-directory nodes are
explicit inodes, and plans the output: a :class:`plan.Tree`. Nothing of the
image touches the host filesystem, so no layer can write outside the disk,
and ownership stays exact without root.

Semantic choices (see each function for the reasoning and citations):

- A missing parent is created as ``0755 root:root`` mtime 0 (containerd's
  ``mkdirAll(parent, 0755)``; docker does the same).
- Parent components are resolved inside the tree as umoci does with
  ``securejoin.SecureJoinVFS`` (docker and containerd likewise resolve the
  parent within the root): a symlinked parent is followed, absolute targets
  start at the image root and ``..`` stops there, so ``a -> /etc`` then
  ``a/passwd`` writes ``etc/passwd`` and ``lib -> usr/lib`` then ``lib/x.so``
  writes ``usr/lib/x.so`` (creating ``usr/lib`` if the link dangles, like
  umoci's ``MkdirAll``). The last component is never followed: an entry named
  like a symlink replaces it. Whiteout and opaque markers and hard-link
  targets resolve their directory the same way. Over 255 hops is a
  :class:`LayerError` (securejoin's ELOOP), as is a parent that resolves to a
  non-directory (umoci's ENOTDIR). It all happens in the in-memory tree.
- Whiteouts and opaque markers apply to the lower layers only, so they run
  before the layer's other entries whatever their position in the tar; a
  marker implies that its directory exists (created like any missing parent).
- A hard link shares the inode its target has at that moment; the link's own
  header metadata is ignored (it describes the same inode). A link that comes
  before a marker of its layer which deletes its lower-layer target keeps that
  inode, as docker, containerd and umoci make it: they apply the tar in order,
  so the link is made while its target exists, and the marker then removes
  the target's name only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from hypeman_images.errors import LayerError, LimitExceeded
from hypeman_images.layers.entries import Entry, Kind, LayerScan
from hypeman_images.layers.limits import Limits, check_image_limits
from hypeman_images.layers.paths import NAME_MAX, Where, join_path, split_path
from hypeman_images.layers.plan import (
    Node,
    Tree,
    directory_entry_bytes,
    place_node,
    tree_stats,
    xattr_fixups,
)
from hypeman_images.layers.xattrs import Xattrs


class _Dir:
    """A directory of the tree being built (never hard-linked, so no inode object)."""

    __slots__ = ("children", "gid", "mode", "mtime", "uid", "xattrs")

    def __init__(self, mode: int, uid: int, gid: int, mtime: int, xattrs: Xattrs) -> None:
        self.mode, self.uid, self.gid, self.mtime, self.xattrs = mode, uid, gid, mtime, xattrs
        self.children: dict[bytes, _Dir | _Inode] = {}


class _Inode:
    """A non-directory inode; several paths may share one (hard links).

    Immutable once made: a later entry at one of its paths makes a new inode
    for that path, so the other paths keep the old content and metadata.
    """

    __slots__ = ("entry", "layer")

    def __init__(self, entry: Entry, layer: int) -> None:
        self.entry = entry
        self.layer = layer


_IMPLICIT = (0o755, 0, 0, 0, ())
# securejoin (and so umoci) fails with ELOOP past 255 dereferences in one path; Linux
# itself stops at 40 (MAXSYMLINKS), but the reference for layers is securejoin.
MAX_SYMLINK_HOPS = 255


class _Builder:
    def __init__(self, limits: Limits) -> None:
        self.root = _Dir(*_IMPLICIT)
        self.limits = limits
        # The inodes a hard link reached (by id; kept alive so no id is reused):
        # only these may have several paths when the tree is planned.
        self.linked: dict[int, _Inode] = {}

    def resolve(self, path: bytes, where: str | Where) -> list[bytes]:
        """The components of ``path``'s real location, every symlink followed in the tree.

        This is ``securejoin.SecureJoinVFS(root, path)`` (github.com/cyphar/
        filepath-securejoin, which umoci's ``UnpackEntry`` applies to the
        directory part of every name and of every hard-link target) over the
        in-memory tree: component by component, a symlink is replaced by its
        target, an absolute target restarts at the image root, ``..`` drops
        the last *resolved* component and stops at the root, so nothing ever
        leaves the image. A missing component, or one below a non-directory,
        is kept as it is (a later mkdir -- or its ENOTDIR -- decides). More
        than :data:`MAX_SYMLINK_HOPS` dereferences is ELOOP, a LayerError.
        """
        if not path:
            return []
        parts = path.split(b"/")
        node: _Dir | _Inode | None = self.root
        for part in parts:  # fast path: no symlink on the way, nothing to rewrite
            node = node.children.get(part) if isinstance(node, _Dir) else None
            if isinstance(node, _Inode) and node.entry.kind is Kind.SYMLINK:
                return self._resolve_links(parts, where)
        return parts

    def _resolve_links(self, parts: list[bytes], where: str | Where) -> list[bytes]:
        todo = parts[::-1]  # a stack: the next component is at the end
        done: list[bytes] = []
        nodes: list[_Dir | _Inode | None] = [self.root]  # nodes[i]: the node at done[:i]
        hops = 0
        while todo:
            part = todo.pop()
            if part in (b"", b"."):
                continue
            if part == b"..":
                if done:
                    done.pop()
                    nodes.pop()
                continue
            holder = nodes[-1]
            node = holder.children.get(part) if isinstance(holder, _Dir) else None
            if isinstance(node, _Inode) and node.entry.kind is Kind.SYMLINK:
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise LayerError(
                        f"{where}: resolving {b'/'.join(parts)!r}: too many levels of symbolic "
                        f"links (more than {MAX_SYMLINK_HOPS}, as securejoin counts)"
                    )
                target = node.entry.target
                if target.startswith(b"/"):
                    del done[:], nodes[1:]
                todo.extend(target.split(b"/")[::-1])
                continue
            if len(part) > NAME_MAX:
                raise LayerError(
                    f"{where}: a symlink on the way to {b'/'.join(parts)!r} names a component of "
                    f"{len(part)} bytes; ext4 allows {NAME_MAX}"
                )
            done.append(part)
            nodes.append(node)
        if sum(len(p) + 1 for p in done) > self.limits.max_path_bytes:
            raise LimitExceeded(
                f"{where}: {b'/'.join(parts)!r} resolves through symlinks to a path longer than "
                f"Limits.max_path_bytes={self.limits.max_path_bytes}"
            )
        return done

    def find(self, parts: list[bytes]) -> _Dir | _Inode | None:
        """The node at resolved ``parts`` (no symlink is followed); ``None`` if absent."""
        node: _Dir | _Inode = self.root
        for part in parts:
            if not isinstance(node, _Dir):
                return None
            child = node.children.get(part)
            if child is None:
                return None
            node = child
        return node

    def lookup(self, path: bytes, where: str | Where) -> _Dir | _Inode | None:
        """The node ``path`` names: its parents resolved, its last component not followed."""
        if not path:
            return self.root
        parent, base = split_path(path)
        holder = self.find(self.resolve(parent, where))
        return holder.children.get(base) if isinstance(holder, _Dir) else None

    def parent_dir(self, path: bytes, where: str | Where) -> _Dir:
        """The directory that will hold ``path``, creating missing ones (0755 root:root).

        The parent is resolved first (:meth:`resolve`, symlinks followed within
        the tree as umoci and containerd do), so ``lib/x.so`` under ``lib ->
        usr/lib`` lands in ``usr/lib``; directories missing at the resolved
        place are created, like umoci's ``MkdirAll`` of the securejoined
        directory (a dangling ``lib -> usr/lib`` gets ``usr/lib``). A
        non-directory there is ENOTDIR in umoci (``mkdir parent``) and here a
        :class:`LayerError`.
        """
        parent, _ = split_path(path)
        if not parent:
            return self.root
        # resolve() then the walk below, in one walk while no symlink is met (nearly
        # always). Directories made before a symlink are the same either way: they
        # are the resolved path's head, which resolving again leaves as it is.
        parts = parent.split(b"/")
        node = self._make_dirs(parts, path, where, follow=False)
        if node is None:
            node = self._make_dirs(self._resolve_links(parts, where), path, where, follow=True)
        assert node is not None
        return node

    def _make_dirs(
        self, parts: list[bytes], path: bytes, where: str | Where, *, follow: bool
    ) -> _Dir | None:
        """The directory at ``parts``, made where missing; ``None`` at a symlink unless told."""
        node = self.root
        for i, part in enumerate(parts):
            child = node.children.get(part)
            if child is None:
                child = node.children[part] = _Dir(*_IMPLICIT)
            elif isinstance(child, _Inode):
                if not follow and child.entry.kind is Kind.SYMLINK:
                    return None
                what = child.entry.kind.value
                raise LayerError(
                    f"{where}: {path!r} needs {b'/'.join(parts[: i + 1])!r} to be a directory, "
                    f"but it is a {what} in the layers below (not a directory)"
                )
            node = child
        return node

    def apply(self, scan: LayerScan) -> None:
        where = f"layer {scan.index} ({scan.name})" if scan.name else f"layer {scan.index}"
        early = self._apply_markers(scan, where)
        for entry in scan.entries:
            self.add(entry, scan.index, Where(where, entry.ordinal, entry.path), early)

    def _apply_markers(self, scan: LayerScan, where: str) -> dict[int, _Inode]:
        """Apply the layer's whiteouts and opaque markers to the layers below.

        Returns, by ordinal, the inodes of the hard links of this layer whose
        target was there when the link came in the tar and a later marker deleted.
        """
        # Whiteouts and opaque markers first: they hide lower-layer content only,
        # never siblings from the same layer, whatever their order in the tar
        # (image-spec layer.md: "Whiteouts ... MUST only apply to resources in
        # lower/parent layers"; "opaque whiteout ... hides all siblings" below).
        # The marker's directory is resolved like any parent (umoci's ociWhiteout
        # gets the securejoined dir): ``a/.wh.x`` under ``a -> /etc`` deletes
        # ``etc/x``, the symlink ``a`` itself only by ``.wh.a``.
        links: list[Entry] = []  # hard links since the last marker
        early: list[tuple[Entry, _Inode]] = []  # what each named when the next marker came
        for entry in scan.entries:
            if entry.kind is Kind.LINK:
                links.append(entry)
                continue
            if entry.kind not in (Kind.WHITEOUT, Kind.OPAQUE):
                continue
            for link in links:
                found = self._quiet_lookup(link.target)
                if isinstance(found, _Inode):
                    early.append((link, found))
            links.clear()
            if entry.kind is Kind.WHITEOUT:
                parent, base = split_path(entry.path)
                holder = self.find(self.resolve(parent, Where(where, entry.ordinal, entry.path)))
                if isinstance(holder, _Dir):
                    holder.children.pop(base, None)  # absent: a no-op
            elif entry.kind is Kind.OPAQUE:
                holder = self.find(
                    self.resolve(entry.path, Where(where, entry.ordinal, entry.path))
                )
                if isinstance(holder, _Dir):
                    holder.children.clear()
        return {
            link.ordinal: inode
            for link, inode in early
            if self._quiet_lookup(link.target) is not inode
        }

    def _quiet_lookup(self, path: bytes) -> _Dir | _Inode | None:
        """:meth:`lookup`, ``None`` where it fails: the entry's own turn will say why."""
        try:
            return self.lookup(path, "")
        except (LayerError, LimitExceeded):
            return None

    def add(
        self, entry: Entry, layer: int, where: Where, early: Mapping[int, _Inode] | None = None
    ) -> None:
        """Apply one entry of ``layer`` after the layer's markers; ``early`` is what
        :meth:`_apply_markers` found for the hard links that came before a marker."""
        if entry.kind in (Kind.WHITEOUT, Kind.OPAQUE):
            # A marker lives inside its directory, so that directory exists in this
            # layer (containerd creates it too); an opaque marker names it itself.
            target = join_path(entry.path, b"x") if entry.kind is Kind.OPAQUE else entry.path
            self.parent_dir(target, where)
            return
        if not entry.path:
            if entry.kind is not Kind.DIR:
                raise LayerError(f"{where}: a {entry.kind.value} cannot replace the root")
            self._set_dir(self.root, entry)
            return
        holder = self.parent_dir(entry.path, where)
        _, base = split_path(entry.path)
        existing = holder.children.get(base)
        if entry.kind is Kind.DIR:
            if isinstance(existing, _Dir):
                self._set_dir(existing, entry)  # keeps children, takes new metadata
            else:
                holder.children[base] = _Dir(
                    entry.mode, entry.uid, entry.gid, entry.mtime, entry.xattrs
                )
        elif entry.kind is Kind.LINK:
            # The link shares the inode its target has now (in this layer earlier or
            # below); replacing the target later leaves the link alone. A target that
            # only appears later in the tar is not there yet: tar order is the order.
            # Its target's parents are resolved too (umoci securejoins the link's
            # directory, not its last component: a link may name a symlink).
            # A target that a marker later in the tar deleted was there when the
            # link came: the link keeps it (tests/support/cases.py,
            # hardlink_to_lower_then_whiteout_same_layer).
            found = self.lookup(entry.target, where)
            if found is None and early:
                found = early.get(entry.ordinal)
            if found is None:
                raise LayerError(
                    f"{where}: hard link {entry.path!r} -> {entry.target!r}: no such file "
                    "in this or a lower layer (at this point of the tar)"
                )
            if isinstance(found, _Dir):
                raise LayerError(
                    f"{where}: hard link {entry.path!r} -> {entry.target!r} names a directory"
                )
            holder.children[base] = found
            self.linked[id(found)] = found
        else:
            holder.children[base] = _Inode(entry, layer)

    @staticmethod
    def _set_dir(node: _Dir, entry: Entry) -> None:
        node.mode, node.uid, node.gid = entry.mode, entry.uid, entry.gid
        node.mtime, node.xattrs = entry.mtime, entry.xattrs


def _walk(root: _Dir) -> Iterator[tuple[bytes, _Dir | _Inode]]:
    """Every (path, node) in component-wise sorted order, parents first; no recursion."""

    def children(prefix: bytes, d: _Dir) -> Iterator[tuple[bytes, _Dir | _Inode]]:
        for name in sorted(d.children):
            yield join_path(prefix, name), d.children[name]

    yield b"", root
    pending = [children(b"", root)]
    while pending:
        item = next(pending[-1], None)
        if item is None:
            pending.pop()
            continue
        yield item
        path, node = item
        if isinstance(node, _Dir):
            pending.append(children(path, node))


def _dir_entry(path: bytes, node: _Dir) -> Entry:
    return Entry(-1, path, Kind.DIR, node.mode, node.uid, node.gid, node.mtime, xattrs=node.xattrs)


def merge(scans: Sequence[LayerScan], limits: Limits | None = None) -> Tree:
    """Apply the scans bottom-up (``scans[0]`` is the base layer) and plan the output."""
    merger = Merger(limits)
    for scan in scans:
        merger.add(scan)
    return merger.tree()


class Merger:
    """:func:`merge` a layer at a time, bottom first, as the scans come in.

    Pass 1 scans layers in parallel and they finish in any order; applying
    each as soon as the ones below it are in leaves only the last layer and
    the planning after the last scan. The image-wide limits are
    checked before each layer is applied, so a layer that pushes the image
    over one is refused before any work is spent on it.
    """

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._builder = _Builder(self.limits)
        self._entries = 0
        self._bytes = 0
        self.layers = 0  # how many have been added: the next one's index

    def add(self, scan: LayerScan) -> None:
        """Apply ``scan``, which must be layer number :attr:`layers` of the image."""
        if scan.index != self.layers:
            raise ValueError(f"layer {scan.index} added after {self.layers} layers, not in order")
        self._entries += len(scan.entries)
        self._bytes += scan.size
        check_image_limits(self._entries, self._bytes, scan.index, self.limits)
        self._builder.apply(scan)
        self.layers += 1

    def tree(self) -> Tree:
        """The merged tree of the layers added so far, planned for output."""
        return _plan(self._builder)


def _plan(builder: _Builder) -> Tree:
    """The built tree as a :class:`plan.Tree`: walked in sorted order, hard links gathered."""
    directories: list[Node] = []
    specials: list[Node] = []
    files: list[Node] = []
    entry_bytes: list[int] = []
    # The paths of each hard-linked inode, in walk (sorted) order; every other
    # inode has one path and becomes its node at once. This is the planning's
    # peak of memory, so only linked inodes get a list: one per inode would cost
    # a list object for every entry of the image.
    linked: dict[int, list[bytes]] = {}
    for path, node in _walk(builder.root):
        if isinstance(node, _Dir):
            directories.append(Node((path,), _dir_entry(path, node), -1))
            entry_bytes.append(directory_entry_bytes(node.children))
            continue
        # The entry's own path object where it is the same path (most are): one
        # copy of each path in memory instead of two.
        if path == node.entry.path:
            path = node.entry.path
        if id(node) in builder.linked:
            linked.setdefault(id(node), []).append(path)
        else:
            place_node(Node((path,), node.entry, node.layer), files, specials)
    for key, paths in linked.items():
        inode = builder.linked[key]
        place_node(Node(tuple(paths), inode.entry, inode.layer), files, specials)
    specials.sort(key=lambda n: n.primary.split(b"/"))
    files.sort(key=lambda n: (n.layer, n.entry.ordinal))
    return Tree(
        tuple(directories),
        tuple(specials),
        tuple(files),
        tree_stats(directories, specials, files, entry_bytes),
        xattr_fixups((*directories, *specials, *files)),
    )
