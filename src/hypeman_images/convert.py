"""Cached layers → one merged tar stream → ``rootfs.ext4`` (DESIGN.md steps 4 and 5).

Each layer is decompressed twice at most: once to scan its headers (and check
its diff_id), once to copy the bodies that survive into mke2fs's stdin.
Nothing of the image touches the host filesystem but the disk itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from .blobs import BlobStore
from .config import BuildOptions
from .compression import open_decompressed
from .e2fsprogs import E2fsprogs, find_e2fsprogs
from .ext4 import SizeInputs, build_disk
from .flatten import Limits, LayerScan, Tree, TreeStats, merge, scan_layer, write_tar
from .pull import PulledImage
from .spec import Descriptor

log = logging.getLogger(__name__)


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


def scan_layers(pulled: PulledImage, blobs: BlobStore, limits: Limits) -> list[LayerScan]:
    """Pass 1: every layer's headers, each checked against the config's diff_id."""
    scans = []
    layers = pulled.resolved.manifest.layers
    for index, (layer, diff_id) in enumerate(zip(layers, pulled.config.diff_ids, strict=True)):
        with _open_layer(blobs, layer) as stream:
            scan = scan_layer(stream, index, name=str(layer.digest), limits=limits)
        scan.check_diff_id(diff_id)
        scans.append(scan)
    return scans


def _open_layer(blobs: BlobStore, layer: Descriptor) -> BinaryIO:
    return open_decompressed(blobs.path(layer.digest), layer.media_type, name=str(layer.digest))


class _Counting:
    """A write-only wrapper that reports how many bytes went through."""

    def __init__(self, out: BinaryIO, report: Callable[[int], None]) -> None:
        self._out = out
        self._report = report
        self.count = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        written = self._out.write(data)
        self.count += len(data)
        self._report(self.count)
        return written

    def flush(self) -> None:
        self._out.flush()


def convert(
    pulled: PulledImage,
    *,
    blobs: BlobStore,
    dest: Path,
    options: BuildOptions,
    on_progress: Callable[[int, int], None] | None = None,
    tools: E2fsprogs | None = None,
    limits: Limits | None = None,
) -> DiskInfo:
    """Make ``dest`` from the pulled image's cached layers; atomically, or not at all."""
    limits = limits or Limits()
    tools = tools or find_e2fsprogs(options.mke2fs or "mke2fs")
    timings: dict[str, float] = {}

    t0 = time.monotonic()
    scans = scan_layers(pulled, blobs, limits)
    tree: Tree = merge(scans, limits)
    timings["flatten_scan_s"] = time.monotonic() - t0
    layers = pulled.resolved.manifest.layers
    total = max(1, tree.stats.regular_bytes)

    def write_stream(out: BinaryIO) -> None:
        sink: BinaryIO = out
        if on_progress is not None:
            report = on_progress
            sink = _Counting(out, lambda n: report(min(n, total), total))  # type: ignore[assignment]
        write_tar(tree, lambda i: _open_layer(blobs, layers[i]), sink, limits)

    t0 = time.monotonic()
    result = build_disk(
        dest,
        size_inputs(tree.stats),
        write_stream,
        seed=pulled.resolved.digest,
        free_space=options.free_space,
        mke2fs=tools,
        xattr_fixups=[(f.path, f.name, f.value) for f in tree.xattr_fixups],
    )
    timings["mke2fs_s"] = time.monotonic() - t0
    return DiskInfo(
        path=result.path,
        size_bytes=result.size_bytes,
        content_bytes=result.content_bytes,
        sha256=str(result.sha256) if result.sha256 else None,
        tool_versions={"e2fsprogs": result.tool_version},
        fallback_used=result.fallback_used,
        timings=timings,
    )
