"""Pass 1: :func:`scan_layer` reads one uncompressed layer tar and records its headers.

It reads the tar front to back exactly once (it can run while the blob
downloads), hashing it for the diff_id and recording every header -- never a
body -- as an :class:`entries.Entry` with the entry's ordinal in the layer.

Whiteouts and opaque markers are recognised by name whatever their type flag
(image-spec ``layer.md`` "Whiteouts"); a bare ``.wh.`` is an error; AUFS
``.wh..wh.*`` bookkeeping is skipped as containerd does.
"""

from __future__ import annotations

import logging
from typing import BinaryIO

from hypeman_images.errors import LayerError, LimitExceeded
from hypeman_images.layers.entries import KIND_OF_TYPEFLAG, Entry, Kind, LayerScan, SparseEntry
from hypeman_images.layers.limits import Limits
from hypeman_images.layers.paths import Where, clean_path, join_path, split_path
from hypeman_images.layers.tarheader import Header
from hypeman_images.layers.tarread import TarReader
from hypeman_images.oci.digest import Digest

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
_AUFS_META_PREFIX = b".wh..wh."  # AUFS bookkeeping (.wh..wh.plnk, .wh..wh.aufs)
_S_IFMT, _S_IFSOCK = 0o170000, 0o140000
_MAX_MAJOR, _MAX_MINOR = (1 << 12) - 1, (1 << 20) - 1  # the kernel's dev_t (MKDEV)


# Distinct values interned per layer (see classify): a hostile layer cannot grow it.
SHARED_MAX = 4096


def classify(header: Header, layer: str, limits: Limits, shared: dict[int, int]) -> Entry | None:
    """Classify one header; ``None`` for what the output never carries.

    ``shared`` interns the modes and mtimes of one layer: a few hundred values
    among tens of thousands of entries, and an int object each is 28 bytes,
    two per entry that the merged tree keeps for the whole build.
    """
    where = Where(layer, header.ordinal)
    path = clean_path(header.name, where=where, limits=limits)
    parent, base = split_path(path)
    # Every marker name below contains ".wh."; most paths do not (a fast test first).
    if WHITEOUT_PREFIX in path:
        parents = parent.split(b"/")
        aufs = any(part.startswith(_AUFS_META_PREFIX) for part in parents)
        if aufs or (base.startswith(_AUFS_META_PREFIX) and base != OPAQUE_MARKER):
            # AUFS bookkeeping from old docker; containerd skips it too (archive/tar.go).
            log.debug("%s: skipping AUFS metadata %r", where, path)
            return None
        if any(part.startswith(WHITEOUT_PREFIX) for part in parents):
            # Markers included: a ".wh.x/.wh..wh..opq" would make a directory ".wh.x".
            raise LayerError(f"{where}: {path!r} lies inside a whiteout name; no tool writes that")
        if base == OPAQUE_MARKER:
            return Entry(header.ordinal, parent, Kind.OPAQUE)
        if base.startswith(WHITEOUT_PREFIX):
            # Recognised by name whatever the type flag: some tools store whiteouts as
            # hard links or character devices (image-spec layer.md "Whiteouts").
            victim = base[len(WHITEOUT_PREFIX) :]
            if victim in (b"", b".", b".."):
                raise LayerError(f"{where}: {header.name!r} is a whiteout with no valid name")
            return Entry(header.ordinal, join_path(parent, victim), Kind.WHITEOUT)
    kind = KIND_OF_TYPEFLAG.get(header.typeflag)
    if kind is None:
        raise LayerError(f"{where}: {path!r} has unsupported tar type {header.typeflag!r}")
    if kind is Kind.FILE and header.mode & _S_IFMT == _S_IFSOCK:
        log.info("%s: skipping socket %r (tar cannot carry sockets)", where, path)
        return None
    target = header.linkname
    if len(target) > limits.max_link_bytes:
        raise LimitExceeded(
            f"{where}: link name of {len(target)} bytes exceeds Limits.max_link_bytes="
            f"{limits.max_link_bytes}"
        )
    if kind is Kind.LINK:
        target = clean_path(target, where=where, limits=limits)
    elif kind is Kind.SYMLINK and (not target or b"\0" in target):
        raise LayerError(f"{where}: symlink {path!r} has an empty or NUL-bearing target")
    devmajor = devminor = 0  # what other kinds' headers say there describes nothing
    if kind in (Kind.CHAR, Kind.BLOCK):
        devmajor, devminor = header.devmajor, header.devminor
        if not (0 <= devmajor <= _MAX_MAJOR and 0 <= devminor <= _MAX_MINOR):
            raise LayerError(
                f"{where}: device {path!r} has device number {devmajor}:{devminor}; Linux "
                f"allows majors up to {_MAX_MAJOR} and minors up to {_MAX_MINOR}"
            )
    mode, mtime = header.mode & 0o7777, header.mtime
    if len(shared) < SHARED_MAX:
        mode, mtime = shared.setdefault(mode, mode), shared.setdefault(mtime, mtime)
    if header.sparse is not None:
        # Its size is the real one (holes included): what the disk gets and is sized for.
        return SparseEntry(
            header.ordinal, path, kind, mode, header.uid, header.gid, mtime, header.size,
            offset=header.offset, xattrs=header.xattrs, sparse=header.sparse,
        )  # fmt: skip
    return Entry(
        ordinal=header.ordinal,
        path=path,
        kind=kind,
        mode=mode,
        uid=header.uid,
        gid=header.gid,
        mtime=mtime,
        size=header.size,
        target=target,
        devmajor=devmajor,
        devminor=devminor,
        xattrs=header.xattrs,
        offset=header.offset,
    )


def scan_layer(
    stream: BinaryIO, index: int, *, name: str = "", limits: Limits | None = None
) -> LayerScan:
    """Pass 1 over the uncompressed tar of layer ``index`` (0 = bottom).

    Reads ``stream`` to its end exactly once; returns every entry's header and
    the sha256 of all bytes read (compare with :meth:`LayerScan.check_diff_id`).
    ``name`` (the blob digest, say) appears in every error.
    """
    limits = limits or Limits()
    where = f"layer {index} ({name})" if name else f"layer {index}"
    reader = TarReader(
        stream,
        where=where,
        max_bytes=limits.max_layer_bytes,
        max_header_bytes=limits.max_header_bytes,
    )
    entries: list[Entry] = []
    shared: dict[int, int] = {}
    for header in reader:
        if header.ordinal >= limits.max_entries:
            raise LimitExceeded(
                f"{where}: more than Limits.max_entries={limits.max_entries} entries"
            )
        entry = classify(header, where, limits, shared)
        if entry is not None:
            entries.append(entry)
    reader.drain()
    return LayerScan(index, name, Digest("sha256", reader.hexdigest()), reader.size, tuple(entries))
