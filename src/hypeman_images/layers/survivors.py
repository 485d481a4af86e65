"""Where the one pass sends what survives: mke2fs's tar stream, or a disk writer's data area.

:class:`onepass.TopDown` decides, layer by layer from the top, which entries
survive the layers above; a :class:`Survivors` receives them in that order.
:class:`TarStream` writes them as the tar stream ``mke2fs -d -`` reads (each
path's header, each body after it, the end-of-archive marker). A writer of
another format may take the bodies alone, as they inflate, and make its tree
from the merge's plan once the pass is proven (``build.onepass_erofs``).
"""

from __future__ import annotations

from typing import BinaryIO, Protocol

from hypeman_images.layers import tarwrite
from hypeman_images.layers.emit import entry_header
from hypeman_images.layers.entries import Entry, sparse_map
from hypeman_images.layers.tarread import TarReader


class Survivors(Protocol):
    """What :meth:`onepass.TopDown.run` writes to, in stream order.

    ``entry`` is every path the stream makes or updates (a directory named
    again, by a lower layer, updates its metadata; a file repeated within a
    layer replaces the file), with ``link_to`` for a hard link; ``body`` a
    regular file's data, right after its ``entry``, read from ``reader``:
    the entry being iterated, or with ``seek`` the body at ``entry.offset``
    (a layer whose scan was known). ``end`` follows the last layer.
    """

    def entry(self, entry: Entry, path: bytes, link_to: bytes | None = None) -> None:
        """A path the stream makes or updates."""

    def body(self, entry: Entry, layer: int, reader: TarReader, *, seek: bool) -> None:
        """Regular file ``entry``'s body, of layer ``layer``; it must be read whole."""

    def end(self) -> None:
        """The stream is complete."""


class TarStream:
    """The survivors as the tar stream mke2fs's tar reader takes.

    mke2fs 1.47.2's ``misc/create_inode_libarchive.c``: what it does with a
    repeated entry is in :mod:`onepass`'s docstring.
    """

    def __init__(self, out: BinaryIO) -> None:
        self.out = out

    def entry(self, entry: Entry, path: bytes, link_to: bytes | None = None) -> None:
        """The entry's tar header."""
        self.out.write(entry_header(entry, path, link_to=link_to))

    def body(self, entry: Entry, layer: int, reader: TarReader, *, seek: bool) -> None:
        """The body at its real size (a sparse file's holes as zeros), padded to a block."""
        if seek:
            reader.copy_at(entry.offset, entry.size, self.out, sparse_map(entry))
        else:
            reader.copy_body(self.out)
        self.out.write(tarwrite.padding(entry.size))

    def end(self) -> None:
        """The end-of-archive marker."""
        self.out.write(tarwrite.END_OF_ARCHIVE)
