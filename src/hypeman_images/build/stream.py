"""mke2fs's stdin and what it made: shared by both ways of :mod:`convert`.

The layers opened for the stream (:func:`open_layer`), the stream counted for
the progress shown (:func:`counted`), what the disk step needs from the tree
(:func:`size_inputs`) and what a conversion returns (:class:`DiskInfo`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from hypeman_images.disk.mke2fs import DiskResult
from hypeman_images.disk.sizing import SizeInputs
from hypeman_images.layers.compression import Hasher, open_decompressed
from hypeman_images.layers.plan import TreeStats
from hypeman_images.oci.spec import Descriptor


@dataclass(frozen=True)
class DiskInfo:
    """The disk a conversion made and what it cost."""

    path: Path
    size_bytes: int
    content_bytes: int
    sha256: str | None
    tool_versions: dict[str, str]
    fallback_used: bool
    timings: dict[str, float] = field(default_factory=dict)
    one_pass: bool = False


def disk_info(result: DiskResult, timings: dict[str, float], one_pass: bool) -> DiskInfo:
    """What :mod:`ext4` made, as a conversion reports it."""
    return DiskInfo(
        path=result.path,
        size_bytes=result.size_bytes,
        content_bytes=result.content_bytes,
        sha256=str(result.sha256) if result.sha256 else None,
        tool_versions={"e2fsprogs": result.tool_version},
        fallback_used=result.fallback_used,
        timings=timings,
        one_pass=one_pass,
    )


def size_inputs(stats: TreeStats) -> SizeInputs:
    """What the disk step needs, from what flatten counted."""
    return SizeInputs(
        inodes=stats.inodes,
        directories=stats.directories,
        file_bytes=stats.regular_bytes,
        file_blocks=stats.regular_blocks,
        long_symlinks=stats.long_symlinks,
        dirent_bytes=stats.directory_entry_bytes,
        xattr_bytes=stats.xattr_bytes,
    )


# The stream's layers inflate in a helper thread (ISA-L drops the GIL),
# overlapping the header writes and copies. 16 MiB ahead rather than isal's
# threaded reader's 2: the decoder keeps going while mke2fs is busy with
# metadata (a directory or many small files), and is ahead when mke2fs wants
# data again.
READ_AHEAD_BLOCKS = 16


def open_layer(
    source: BinaryIO | Path, layer: Descriptor, hash_into: Hasher | None = None
) -> BinaryIO:
    """The uncompressed tar of ``layer`` for mke2fs's stream, from its blob or a feed of it.

    ``hash_into`` is fed every byte (the diff_id), in the read-ahead thread.
    """
    return open_decompressed(
        source,
        layer.media_type,
        name=str(layer.digest),
        read_ahead=READ_AHEAD_BLOCKS,
        hash_into=hash_into,
    )


class _Counting:
    """A write-only wrapper that reports how many bytes went through.

    It reports once per :data:`REPORT_EVERY` bytes and at :meth:`flush`, not
    per write: a write is often one 512-byte header, and a progress bar's
    update costs more than that write.
    """

    REPORT_EVERY = 4 << 20

    def __init__(self, out: BinaryIO, report: Callable[[int], None]) -> None:
        self._out = out
        self._report = report
        self.count = 0
        self._next = self.REPORT_EVERY

    def write(self, data: bytes | bytearray | memoryview) -> int:
        written = self._out.write(data)
        self.count += len(data)
        if self.count >= self._next:
            self._next = self.count + self.REPORT_EVERY
            self._report(self.count)
        return written

    def flush(self) -> None:
        self._out.flush()
        self._report(self.count)


@contextlib.contextmanager
def counted(
    out: BinaryIO, report: Callable[[int, int], None] | None, total: Callable[[], int]
) -> Iterator[BinaryIO]:
    """``out`` (mke2fs's stdin), counting for ``report`` of ``total()``; flushed at the end."""
    sink: BinaryIO = out
    if report is not None:
        progress = report

        def each(n: int) -> None:
            whole = max(1, total())
            progress(min(n, whole), whole)

        sink = _Counting(out, each)  # type: ignore[assignment]
    yield sink
    sink.flush()
