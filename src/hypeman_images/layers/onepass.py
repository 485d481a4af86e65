"""All layers in one pass, top layer first: mke2fs's stream while each layer is read once.

The two-pass path (:mod:`merge`, :mod:`emit`) reads every layer to plan the tree, then
again to copy the bodies, so mke2fs waits for the whole first pass.
Reading the layers from the top down makes one pass enough for ordinary
images: an entry of a lower layer survives unless a layer above deleted or
replaced it, and the layers above are done by then. Each survivor goes to
mke2fs at once, its body copied straight from the layer, and every layer is
hashed and scanned on the way, as pass 1 would.

mke2fs 1.47.2's tar reader makes this possible: a repeated directory entry
only updates the directory's metadata, a repeated file entry replaces the
file (hard links keep the old inode), and missing parents are our job
(``misc/create_inode_libarchive.c``). So a directory that an upper layer only
implied as a parent is written with the implicit ``0755 root:root`` metadata
and updated when a lower layer names it, as the bottom-up merge would leave it.

The pass follows the plain cases only. Whatever it cannot decide alone -- a
symlinked parent (``lib/x`` over ``lib -> usr/lib``), a type change within a
layer, a hard link to a file of a lower layer or to one a layer above
replaced -- raises :class:`Speculation`, and so does any difference between
what it wrote and the tree :func:`merge.merge` plans from the same scans
(:meth:`TopDown.check`): the caller then discards the disk and builds it the
two-pass way, which is the reference. The result is therefore always the
merge's tree; the single pass only makes it sooner.

The survivors go to a :class:`survivors.Survivors`: mke2fs's tar stream
(:class:`survivors.TarStream`), or the EROFS writer's data area, which takes
the bodies alone and builds its tree from the merge's once :meth:`TopDown.check`
has proven them the same (``build.onepass_erofs``).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from hypeman_images.errors import LimitExceeded
from hypeman_images.layers import tarread
from hypeman_images.layers.compression import Hasher
from hypeman_images.layers.entries import Entry, Kind, LayerScan
from hypeman_images.layers.limits import Limits, check_image_limits
from hypeman_images.layers.plan import (
    Node,
    Tree,
    TreeStats,
    directory_entry_bytes,
    place_node,
    tree_stats,
    xattr_fixups,
)
from hypeman_images.layers.scan import classify
from hypeman_images.layers.survivors import Survivors
from hypeman_images.layers.xattrs import XattrFixup, tar_xattrs
from hypeman_images.oci.digest import Digest

# How often a layer still downloading is asked what its blob says (see TopDown.stated).
STATED_EVERY = 4 << 20


class Speculation(Exception):
    """The single pass met what only the two-pass merge decides; says what and where."""


# What the layers read so far left at a path.
_DIR, _NONDIR, _GONE = 0, 1, 2
_IMPLICIT_DIR = (0o755, 0, 0, 0)  # merge's implicit parent: 0755 root:root, mtime 0


class _Seen:
    """The decision at one path.

    ``layer`` made it; ``explicit``: a directory entry set its metadata (not
    just implied as a parent); ``hidden``: the highest layer whose whiteout or
    opaque marker hides the lower layers' content at or below this directory
    (-1: none).
    """

    __slots__ = ("explicit", "hidden", "kind", "layer")

    def __init__(self, kind: int, layer: int, explicit: bool = False) -> None:
        self.kind, self.layer, self.explicit, self.hidden = kind, layer, explicit, -1


@dataclass(eq=False, slots=True)
class _Body:
    """A non-directory inode mke2fs made; hard links share the object."""

    entry: Entry
    layer: int


@dataclass(slots=True)
class _DirMeta:
    """A directory's metadata as the entries written so far left it (all its xattrs)."""

    meta: tuple[int, int, int, int]
    xattrs: tuple[tuple[str, bytes], ...] = ()


@dataclass
class TopDown:
    """One pass over the layers whose names ``names`` lists bottom first (read top first).

    ``open_layer(i, hasher)`` opens layer ``i``'s uncompressed tar and feeds
    every byte of it to ``hasher`` (the diff_id), best in another thread
    (:func:`compression.open_decompressed`'s ``hash_into``); ``hasher`` is
    None for a layer in ``known``, whose scan (from the scan cache) is used
    instead of its headers. ``sizes``: the most each layer may inflate to (the
    disk was sized for it, :func:`build.oneplan.one_pass_sizes`); a layer that
    inflates past it stops the pass at once, so a decompression bomb fills
    neither the disk nor the data dir's filesystem. ``stated(i)``, if given,
    is the least layer ``i`` inflates to as its whole blob says (a gzip
    trailer; ``None`` while it downloads): asked as the layer opens and every
    :data:`STATED_EVERY` bytes read till it answers, it stops the pass sooner.

    :meth:`run` sends the stream to a :class:`Survivors` and returns the layers' scans (bottom layer
    first, as :func:`merge.merge` takes them); :meth:`check` then compares
    what the stream made with the merge's tree.
    """

    open_layer: Callable[[int, Hasher | None], BinaryIO]
    names: list[str]
    limits: Limits = field(default_factory=Limits)
    known: dict[int, LayerScan] = field(default_factory=dict)
    sizes: dict[int, int] = field(default_factory=dict)
    stated: Callable[[int], int | None] | None = None
    _seen: dict[bytes, _Seen] = field(default_factory=dict, init=False)
    _made: dict[bytes, _Body | _DirMeta] = field(default_factory=dict, init=False)
    # Directories whose every ancestor _parents passed in the layer being read. It
    # holds for the whole layer: markers apply after it, and a directory that
    # becomes something else within a layer is a Speculation.
    _open: set[bytes] = field(default_factory=set, init=False)
    _plan: tuple[TreeStats, tuple[XattrFixup, ...]] | None = field(default=None, init=False)
    # The bodies a hard link shares (by id; kept alive so no id is reused).
    _linked: dict[int, _Body] = field(default_factory=dict, init=False)

    def run(
        self, out: Survivors, expect: Callable[[LayerScan], None] | None = None
    ) -> list[LayerScan]:
        """Send the merged stream to ``out``; ``expect(scan)`` checks each layer when read.

        Raises :class:`Speculation` for a case the pass leaves to the merge,
        and :class:`LayerError` / :class:`LimitExceeded` for a bad layer, as
        pass 1 would.
        """
        top = len(self.names)
        self._seen[b""] = _Seen(_DIR, top)
        self._made[b""] = _DirMeta(_IMPLICIT_DIR)
        out.entry(_implicit(b""), b"")
        scans: list[LayerScan] = []
        entries = size = 0
        for index in reversed(range(top)):
            scan = self._layer(index, out, entries)
            if expect is not None:
                expect(scan)
            entries += len(scan.entries)
            size += scan.size
            check_image_limits(entries, size, index, self.limits)
            scans.append(scan)
        out.end()
        return scans[::-1]

    # -- one layer ----------------------------------------------------------------------

    def _layer(self, index: int, out: Survivors, before: int) -> LayerScan:
        self._open.clear()
        known = self.known.get(index)
        name = self.names[index]
        where = f"layer {index} ({name})" if name else f"layer {index}"
        limits = self.limits
        cap = min(limits.max_layer_bytes, self.sizes.get(index, limits.max_layer_bytes))
        if known is not None:
            if cap < known.size and cap < limits.max_layer_bytes:  # past the limits: they speak
                raise _past_sizing(where, cap, f"its scan says {known.size}")
            self._layer_known(known, out)
            return known
        markers: list[Entry] = []
        found: list[Entry] = []
        shared: dict[int, int] = {}
        hasher = hashlib.sha256()
        stated, ask_at = self.stated if cap < limits.max_layer_bytes else None, 0
        with self.open_layer(index, hasher) as stream, _past(cap, limits, where):
            reader = self._reader(stream, where, cap)
            for header in reader:
                if stated is not None and reader.size >= ask_at:
                    stated, ask_at = _asked(stated, index, cap, where), ask_at + STATED_EVERY
                if header.ordinal >= limits.max_entries:
                    raise LimitExceeded(
                        f"{where}: more than Limits.max_entries={limits.max_entries} entries"
                    )
                if before + len(found) >= limits.max_entries:
                    check_image_limits(before + len(found) + 1, 0, index, limits)
                entry = classify(header, where, limits, shared)
                if entry is None:
                    continue
                found.append(entry)
                if self._entry(entry, index, out, markers):
                    out.body(entry, index, reader, seek=False)
            reader.drain()
        for marker in markers:
            self._hide(marker, index)
        digest = Digest("sha256", hasher.hexdigest())
        return LayerScan(index, name, digest, reader.size, tuple(found))

    def _layer_known(self, scan: LayerScan, out: Survivors) -> None:
        """A layer whose scan is known: its entries as scanned, bodies found by offset.

        The same decisions, so the same stream, as reading the headers again; but
        no parsing and no hashing (the diff_id is the scan's), and the layer is
        read only up to its last body written.
        """
        index, limits = scan.index, self.limits
        markers: list[Entry] = []
        with contextlib.ExitStack() as stack:
            reader: tarread.TarReader | None = None
            for entry in scan.entries:
                if not self._entry(entry, index, out, markers):
                    continue
                if reader is None:
                    stream = stack.enter_context(self.open_layer(index, None))
                    reader = self._reader(
                        stream, f"layer {index} ({scan.name})", limits.max_layer_bytes
                    )
                out.body(entry, index, reader, seek=True)
        for marker in markers:
            self._hide(marker, index)

    def _reader(self, stream: BinaryIO, where: str, max_bytes: int) -> tarread.TarReader:
        # Hashing is the read-ahead's (hash_into) or not needed (a known scan).
        return tarread.TarReader(
            stream,
            where=where,
            max_bytes=max_bytes,
            max_header_bytes=self.limits.max_header_bytes,
            hash_stream=False,
        )

    def _entry(self, entry: Entry, k: int, out: Survivors, markers: list[Entry]) -> bool:
        """Handle one entry of layer ``k``; True if its body must follow in the stream."""
        if entry.kind in (Kind.WHITEOUT, Kind.OPAQUE):
            # The marker's directory exists in this layer; what it hides is below
            # this layer only, so it is applied once the layer is done.
            holder = entry.path if entry.kind is Kind.OPAQUE else _parent(entry.path)
            if self._parents(holder + b"/x" if holder else b"x", k, out):
                markers.append(entry)
            return False
        return self._visit(entry, k, out) and entry.kind is Kind.FILE and entry.size > 0

    def _visit(self, e: Entry, k: int, out: Survivors) -> bool:
        """Write ``e`` of layer ``k`` if it survives the layers above; True if written."""
        p = e.path
        if not p:
            if e.kind is not Kind.DIR:
                raise Speculation(f"layer {k}: a {e.kind.value} entry for the root")
            return self._dir(e, k, self._seen[b""], out)
        if not self._parents(p, k, out):
            return False
        seen = self._seen.get(p)
        if e.kind is Kind.DIR:
            if seen is None:
                self._seen[p] = _Seen(_DIR, k, explicit=True)
                self._write_dir(e, out)
                return True
            if seen.kind == _DIR:
                return self._dir(e, k, seen, out)
            if seen.layer > k:
                return False  # replaced or deleted above: this and everything under it
            raise Speculation(f"layer {k}: {p!r} changes type within the layer")
        if seen is not None:
            if seen.layer > k and (seen.kind != _DIR or seen.explicit or seen.hidden > k):
                return False
            if seen.kind == _DIR:
                # An upper layer only implied this directory (a parent of its entries)
                # while this layer has something else here: the merge follows it.
                raise Speculation(f"layer {k}: {p!r} is a {e.kind.value} under a directory above")
        if e.kind is Kind.LINK:
            return self._link(e, k, out)
        self._seen[p] = _Seen(_NONDIR, k)
        self._made[p] = _Body(e, k)
        out.entry(e, p)
        return True

    def _dir(self, e: Entry, k: int, seen: _Seen, out: Survivors) -> bool:
        """A directory entry where a directory is already: metadata only, if not decided above."""
        if seen.layer > k and (seen.explicit or seen.hidden > k):
            return False
        made = self._made[e.path]
        assert isinstance(made, _DirMeta)
        if tar_xattrs(made.xattrs):
            # mke2fs only adds a repeated entry's xattrs; the merge replaces them.
            raise Speculation(f"layer {k}: {e.path!r} is set twice with tar-borne xattrs")
        seen.explicit, seen.layer = True, k
        self._write_dir(e, out)
        return True

    def _link(self, e: Entry, k: int, out: Survivors) -> bool:
        # A link shares the inode its target has at this point of the layer: one
        # this layer wrote earlier, still at that path, is all a single pass knows.
        target = self._seen.get(e.target)
        body = self._made.get(e.target)
        if (
            target is None
            or target.kind != _NONDIR
            or target.layer != k
            or not isinstance(body, _Body)
            or e.target == e.path
        ):
            raise Speculation(f"layer {k}: hard link {e.path!r} -> {e.target!r} reaches below")
        self._seen[e.path] = _Seen(_NONDIR, k)
        self._made[e.path] = body
        self._linked[id(body)] = body
        out.entry(body.entry, e.path, link_to=e.target)
        return True

    def _parents(self, p: bytes, k: int, out: Survivors) -> bool:
        """Make ``p``'s parent directories exist; False if a layer above hides ``p``."""
        root = self._seen[b""]
        if root.hidden > k:
            return False
        parts = p.split(b"/")
        if len(parts) == 1 or p.rpartition(b"/")[0] in self._open:
            return True
        path = b""
        for depth, part in enumerate(parts[:-1]):
            path = path + b"/" + part if depth else part
            seen = self._seen.get(path)
            if seen is None:
                self._seen[path] = _Seen(_DIR, k)
                self._write_dir(_implicit(path), out)
                self._open.add(path)
                continue
            if seen.kind == _DIR:
                if seen.hidden > k:
                    return False
                self._open.add(path)
                continue
            if seen.layer > k:
                return False  # replaced by a non-directory, or deleted, above
            raise Speculation(f"layer {k}: {p!r} lies under the {path!r} of the same layer")
        return True

    def _hide(self, marker: Entry, k: int) -> None:
        """Apply a whiteout or opaque marker of layer ``k`` to the layers below it."""
        seen = self._seen.get(marker.path)
        if seen is None:
            self._seen[marker.path] = _Seen(_GONE, k)
        elif seen.kind == _DIR:
            seen.hidden = max(seen.hidden, k)

    def _write_dir(self, e: Entry, out: Survivors) -> None:
        self._made[e.path] = _DirMeta((e.mode, e.uid, e.gid, e.mtime), e.xattrs)
        out.entry(e, e.path)

    # -- the plan and its proof --------------------------------------------------------------

    def planned(self) -> tuple[TreeStats, tuple[XattrFixup, ...]]:
        """The stats and xattr fixups of the tree the stream made, for sizing the disk.

        Counted from the paths written, the way :func:`merge.merge` counts its
        tree (the same functions over the same kind of nodes), so the disk can be
        shrunk and hashed while the merge runs; :meth:`check` then requires them
        to be the merge's.
        """
        if self._plan is not None:
            return self._plan
        children: dict[bytes, list[bytes]] = {}
        linked: dict[int, list[bytes]] = {}  # only hard-linked bodies have several paths
        directories: list[Node] = []
        specials: list[Node] = []
        files: list[Node] = []
        for path, made in self._made.items():
            if path:
                parent, _, name = path.rpartition(b"/")
                children.setdefault(parent, []).append(name)
            if isinstance(made, _DirMeta):
                mode, uid, gid, mtime = made.meta
                entry = Entry(-1, path, Kind.DIR, mode, uid, gid, mtime, xattrs=made.xattrs)
                directories.append(Node((path,), entry, -1))
            elif id(made) in self._linked:
                linked.setdefault(id(made), []).append(path)
            else:
                place_node(Node((path,), made.entry, made.layer), files, specials)
        for key, paths in linked.items():
            # The merge's primary path of a hard-linked inode is the first in tree order.
            body, ordered = self._linked[key], tuple(sorted(paths, key=_tree_order))
            place_node(Node(ordered, body.entry, body.layer), files, specials)
        directories.sort(key=lambda node: _tree_order(node.primary))
        entry_bytes = [directory_entry_bytes(children.get(d.primary, ())) for d in directories]
        self._plan = (
            tree_stats(directories, specials, files, entry_bytes),
            xattr_fixups((*directories, *specials, *files), say_dropped=False),
        )
        return self._plan

    def check(self, tree: Tree) -> None:
        """Raise :class:`Speculation` unless the stream made exactly ``tree``.

        Its stats and xattr fixups too, if :meth:`planned` sized the disk.
        """
        if self._plan is not None and self._plan != (tree.stats, tree.xattr_fixups):
            raise Speculation("the tree's stats or xattr fixups differ from the merge's")
        nodes = tree.nodes()
        if len(nodes) != len(self._made):
            extra = sorted(set(self._made) - set(nodes))[:3]
            missing = sorted(set(nodes) - set(self._made))[:3]
            raise Speculation(f"paths differ: written {extra!r}..., planned {missing!r}...")
        inode_of: dict[int, int] = {}  # id(_Body) -> id(Node), and the reverse
        node_of: dict[int, int] = {}
        for path, node in nodes.items():
            made = self._made.get(path)
            e = node.entry
            if isinstance(made, _DirMeta):
                if e.kind is not Kind.DIR or made.meta != (e.mode, e.uid, e.gid, e.mtime):
                    raise Speculation(f"{path!r}: written as a directory {made.meta}, planned {e}")
                if made.xattrs != e.xattrs:
                    raise Speculation(f"{path!r}: directory xattrs differ")
                continue
            if made is None or made.layer != node.layer or made.entry.ordinal != e.ordinal:
                raise Speculation(f"{path!r}: written {made}, planned layer {node.layer} {e}")
            if inode_of.setdefault(id(made), id(node)) != id(node) or node_of.setdefault(
                id(node), id(made)
            ) != id(made):
                raise Speculation(f"{path!r}: hard links differ from the plan")

    def forget(self) -> None:
        """Drop what the pass knows of each path, once :meth:`check` has used it."""
        self._seen.clear()
        self._made.clear()
        self._linked.clear()
        self._open.clear()


@contextlib.contextmanager
def _past(cap: int, limits: Limits, where: str) -> Iterator[None]:
    """Turn the reader's size limit into :class:`Speculation` when the cap was ours."""
    try:
        yield
    except LimitExceeded as exc:
        if cap < limits.max_layer_bytes and "max_layer_bytes" in str(exc):
            raise _past_sizing(where, cap) from None
        raise


def _past_sizing(where: str, cap: int, said: str = "") -> Speculation:
    """The one pass stops: layer ``where`` is bigger than the disk was sized for."""
    because = f": {said}" if said else ""
    return Speculation(f"{where} inflates past the {cap} bytes the disk was sized for{because}")


def _asked(
    stated: Callable[[int], int | None], index: int, cap: int, where: str
) -> Callable[[int], int | None] | None:
    """Raise :class:`Speculation` if layer ``index``'s blob says it is past ``cap``;
    what to ask next time (``None`` once it answered)."""
    at_least = stated(index)
    if at_least is not None and at_least > cap:
        raise _past_sizing(where, cap, f"its blob says at least {at_least}")
    return stated if at_least is None else None


def _parent(path: bytes) -> bytes:
    return path.rpartition(b"/")[0]


def _tree_order(path: bytes) -> list[bytes]:
    return path.split(b"/")


def _implicit(path: bytes) -> Entry:
    mode, uid, gid, mtime = _IMPLICIT_DIR
    return Entry(-1, path, Kind.DIR, mode, uid, gid, mtime)
