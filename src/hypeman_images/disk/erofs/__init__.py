"""EROFS images written by hypeman-images itself, exact and reproducible.

The writer takes entries (:class:`Entry`) with streamed bodies and writes an
uncompressed EROFS image (``fs/erofs/erofs_fs.h``) that the kernel mounts
read-only: :class:`ErofsWriter`, or :func:`write_erofs` for an iterable.
A caller that has the bodies before the tree places them first
(:meth:`ErofsWriter.place`) and adds the entries later.
Modules: ``model`` (the input), ``format`` (on-disk records), ``checksum``
(crc32c), ``data`` (the streamed data area), ``xattrs``, ``dirs``,
``layout`` (slots in the metadata area), ``inodes``, ``metadata`` (the end
of a build) and ``writer``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import BinaryIO

from hypeman_images.disk.erofs.data import Body
from hypeman_images.disk.erofs.model import Entry, ErofsInputError, Kind, SparseMap
from hypeman_images.disk.erofs.writer import ErofsResult, ErofsWriter, Placed
from hypeman_images.oci.digest import Digest

__all__ = [
    "Body",
    "Entry",
    "ErofsInputError",
    "ErofsResult",
    "ErofsWriter",
    "Kind",
    "Placed",
    "SparseMap",
    "write_erofs",
]


def write_erofs(
    entries: Iterable[tuple[Entry, Body | None]],
    out: BinaryIO,
    seed: Digest,
    *,
    on_head: Callable[[int], None] | None = None,
) -> ErofsResult:
    """Write the image of ``entries`` (each with its body or ``None``) to ``out``.

    ``on_head``: as for :meth:`ErofsWriter.finish`.
    """
    writer = ErofsWriter(out, seed)
    for entry, body in entries:
        writer.add(entry, body)
    return writer.finish(on_head=on_head)
