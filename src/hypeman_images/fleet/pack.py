"""Packing a disk into its artifact: read once, in order, hashed whole, compressed in parallel.

The reader takes ``chunk_size`` bytes at a time and feeds the whole-disk
sha256 (the config's ``disk_sha256``) while up to ``parallel`` chunks are
compressed on other threads (zstd releases the GIL) and handed to
``on_chunk`` — where :func:`fleet.push.push_disk` uploads them — so reading,
hashing, compressing and uploading overlap, and at most ``parallel + 1``
chunks and their compressed forms are in memory.

Each chunk is one zstd frame (RFC 8878) made the same way every time:
single-threaded (zstd's worker threads may cut the input differently),
level :data:`ZSTD_LEVEL`, no content checksum (the blob's digest covers
every byte), and the content size written in the frame header, which the
fetch holds against the size the manifest declares before inflating
anything. The same disk, recipe and zstd release give the same manifest
digest; a zstd release that compresses differently gives an equivalent
artifact under the same per-recipe tag (docs/disk-artifacts.md, "Determinism").
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import zstandard

from hypeman_images.errors import CorruptDisk, InvalidArgument, StorageError
from hypeman_images.fleet.artifact import (
    CHUNK_SIZE,
    CHUNK_TYPE,
    Chunk,
    DiskArtifact,
    build_artifact,
)
from hypeman_images.fleet.config import DiskConfig, Runtime
from hypeman_images.fleet.recipe import Recipe
from hypeman_images.fsutil import storage_error
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.spec import Descriptor

ZSTD_LEVEL = 3
BLOCK = 4096  # chunks start on filesystem block boundaries

OnChunk = Callable[[Chunk, bytes], None]


def compress_chunk(data: bytes, level: int = ZSTD_LEVEL) -> bytes:
    """One deterministic zstd frame of ``data``, its size in the header, no checksum."""
    compressor = zstandard.ZstdCompressor(
        level=level, write_checksum=False, write_content_size=True, threads=0
    )
    return compressor.compress(data)


def pack_disk(
    disk: Path,
    subject: Descriptor,
    recipe: Recipe,
    runtime: Runtime,
    *,
    chunk_size: int = CHUNK_SIZE,
    parallel: int = 2,
    expected_sha256: Digest | None = None,
    on_chunk: OnChunk | None = None,
) -> DiskArtifact:
    """The artifact of ``disk``, built from ``subject`` the way ``recipe`` says.

    ``on_chunk(chunk, compressed)`` runs on a worker thread for each chunk as
    soon as it is compressed; an exception there stops the packing.
    ``expected_sha256`` is the sha256 recorded when the disk was built: a disk
    that no longer hashes to it is :class:`CorruptDisk`, and never shared.
    """
    if recipe.source != subject.digest:
        raise InvalidArgument(f"the recipe's source {recipe.source} is not {subject.digest}")
    if chunk_size <= 0 or chunk_size % BLOCK:
        raise InvalidArgument(f"chunk size {chunk_size} is not a positive multiple of {BLOCK}")
    try:
        size = disk.stat().st_size
        with disk.open("rb") as handle:
            chunks, sha256 = _read_chunks(handle, size, chunk_size, max(1, parallel), on_chunk)
            if handle.read(1):
                raise StorageError(f"{disk} grew while it was being packed")
    except OSError as exc:
        raise storage_error(exc, f"cannot read the disk {disk}") from exc
    if size == 0:
        raise InvalidArgument(f"{disk} is empty")
    if expected_sha256 is not None and sha256 != expected_sha256:
        raise CorruptDisk(
            f"{disk} hashes to {sha256}, not to the {expected_sha256} recorded when it was "
            "built: it changed since, and is not shared; remove the image and pull it again"
        )
    config = DiskConfig(recipe, runtime, size, sha256, chunk_size)
    return build_artifact(subject, config, chunks)


def _read_chunks(
    handle: BinaryIO, size: int, chunk_size: int, parallel: int, on_chunk: OnChunk | None
) -> tuple[list[Chunk], Digest]:
    """Read, hash and hand out the chunks; the compressed ones come back in order."""
    hasher = hashlib.sha256()
    done: list[Chunk] = []
    pending: deque[Future[Chunk]] = deque()
    with ThreadPoolExecutor(parallel, thread_name_prefix="pack") as pool:
        try:
            for offset in range(0, size, chunk_size):
                data = handle.read(min(chunk_size, size - offset))
                if len(data) != min(chunk_size, size - offset):
                    raise StorageError(f"the disk shrank while it was being packed, at {offset}")
                hasher.update(data)
                pending.append(pool.submit(_pack_one, offset, data, on_chunk))
                del data
                while len(pending) >= parallel:
                    done.append(pending.popleft().result())
            while pending:
                done.append(pending.popleft().result())
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    return done, Digest("sha256", hasher.hexdigest())


def _pack_one(offset: int, data: bytes, on_chunk: OnChunk | None) -> Chunk:
    compressed = compress_chunk(data)
    blob = Descriptor(CHUNK_TYPE, Digest.of(compressed), len(compressed))
    chunk = Chunk(offset, len(data), blob)
    if on_chunk is not None:
        on_chunk(chunk, compressed)
    return chunk


__all__ = ["ZSTD_LEVEL", "compress_chunk", "pack_disk"]
