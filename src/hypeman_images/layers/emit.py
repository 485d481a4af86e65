"""Pass 3: :func:`write_tar` writes the planned tree as one tar stream for ``mke2fs -d -``.

The canonical order: the root ``./`` and every directory in sorted order,
then symlinks, devices and fifos, then -- layer by layer, re-reading each
layer that still provides a regular file once -- every surviving regular file
at its primary path with its body copied straight from the layer, each
followed by hard-link headers for its other paths. mke2fs 1.47.2 needs every
parent and every link target earlier in the stream
(``misc/create_inode_libarchive.c``); this order gives both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO

from hypeman_images.layers.entries import TYPEFLAG_OF_KIND, Entry, Kind, sparse_map
from hypeman_images.layers.limits import Limits
from hypeman_images.layers.plan import Node, Tree
from hypeman_images.layers.tar import HARDLINK
from hypeman_images.layers.tarread import TarReader
from hypeman_images.layers.tarwrite import END_OF_ARCHIVE, encode_header, padding
from hypeman_images.layers.xattrs import tar_xattrs


def entry_header(entry: Entry, path: bytes, *, link_to: bytes | None = None) -> bytes:
    """The tar header that makes ``path`` in mke2fs: ``entry``'s kind and metadata.

    With ``link_to``, a hard link to that path instead; it still carries the
    inode's metadata, because mke2fs applies a hard-link header's
    uid/gid/mode/mtime to the shared inode (verified with 1.47.2). Only the
    xattrs mke2fs itself sets (:data:`xattrs.XATTR_POLICY`) go in the header.
    """
    e = entry
    if link_to is not None:
        return encode_header(
            path, HARDLINK, mode=e.mode, uid=e.uid, gid=e.gid, mtime=e.mtime,
            linkname=link_to,
        )  # fmt: skip
    name = b"./" if not path else path + b"/" if e.kind is Kind.DIR else path
    return encode_header(
        name,
        TYPEFLAG_OF_KIND[e.kind],
        mode=e.mode,
        uid=e.uid,
        gid=e.gid,
        size=e.size if e.kind is Kind.FILE else 0,
        mtime=e.mtime,
        linkname=e.target if e.kind is Kind.SYMLINK else b"",
        devmajor=e.devmajor,
        devminor=e.devminor,
        xattrs=tar_xattrs(e.xattrs),
    )


def _write_node(out: BinaryIO, node: Node) -> None:
    out.write(entry_header(node.entry, node.primary))


def _write_links(out: BinaryIO, node: Node) -> None:
    for path in node.paths[1:]:
        out.write(entry_header(node.entry, path, link_to=node.primary))


def write_tar(
    tree: Tree,
    open_layer: Callable[[int], BinaryIO],
    out: BinaryIO,
    limits: Limits | None = None,
) -> None:
    """Write the merged tree to ``out`` as one tar stream in the canonical order.

    ``open_layer(i)`` must return a fresh reader of layer ``i``'s *uncompressed*
    tar, the same bytes :func:`scan.scan_layer` saw; it is called at most once per
    layer, only for layers that still provide a non-empty regular file, and each
    such layer is read only up to its last needed body. The stream is a function
    of the tree alone: same layers, same bytes.
    """
    limits = limits or Limits()
    for node in tree.directories:
        _write_node(out, node)
    for node in tree.specials:
        _write_node(out, node)
        _write_links(out, node)
    by_layer: dict[int, list[Node]] = {}
    for node in tree.files:
        by_layer.setdefault(node.layer, []).append(node)
    for layer, nodes in by_layer.items():
        _copy_layer_files(layer, nodes, open_layer, out, limits)
    out.write(END_OF_ARCHIVE)


def _copy_layer_files(
    layer: int,
    nodes: list[Node],
    open_layer: Callable[[int], BinaryIO],
    out: BinaryIO,
    limits: Limits,
) -> None:
    # Each body is found by the offset pass 1 recorded, not by parsing the
    # headers again: the bytes between are inflated and dropped unread, so no
    # header in between is decoded a second time.
    stream: BinaryIO | None = None
    reader: TarReader | None = None
    try:
        for node in nodes:
            size = node.entry.size
            if size and reader is None:
                stream = open_layer(layer)
                reader = TarReader(
                    stream,
                    where=f"layer {layer}",
                    max_bytes=limits.max_layer_bytes,
                    max_header_bytes=limits.max_header_bytes,
                    hash_stream=False,
                )
            _write_node(out, node)
            if size:
                assert reader is not None
                reader.copy_at(node.entry.offset, size, out, sparse_map(node.entry))
                out.write(padding(size))
            _write_links(out, node)
    finally:
        if stream is not None:
            stream.close()
