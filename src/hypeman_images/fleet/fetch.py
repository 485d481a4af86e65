"""Fetching a disk artifact into a temp file beside its destination, verified at every step.

Up to ``parallel`` chunks download at once; each is read through a
:class:`VerifyingStream` (its digest and size), inflated as it arrives
(one zstd frame whose header must declare the chunk's size, a window of at
most :data:`MAX_WINDOW`) and written at its offset, so network, inflating
and writing overlap and memory holds a piece of each chunk in flight, never
a whole one. A chunk that inflates past its declared size stops at once (a
decompression bomb); one that inflates short is truncated. Blocks of zeros
are not written: the temp file starts as a hole of the disk's size, as
mke2fs's own output is sparse. Each written piece is handed to the calling
thread, which hashes the disk in order as the pieces land (:mod:`.diskhash`:
from memory, a bounded amount; read back only what ran too far ahead), so
the whole-disk sha256 is ready soon after the last chunk is. It must equal
the config's ``disk_sha256``. The format's checker (``e2fsck -fn`` for ext4,
``fsck.erofs`` for EROFS) starts as soon as every chunk is written and its
digest checked, beside the end of the hashing, and must find nothing. The
device writes start as each chunk lands, as mke2fs's are started during a
build, so the checker's and our fsync find little left to write; from a
thread of their own (:func:`fsutil.writeback_thread`), or a fetching thread
would stop fetching while the device's queue is full.

Dropped connections resume with ``Range`` inside the registry client; a
chunk that still fails for a transient reason is fetched again (its bytes
rewritten whole, its share of the hash redone), ``attempts`` times at most.
Any failure removes the temp file and raises: :class:`DigestMismatch` (bytes
not what their digest names), :class:`DiskArtifactInvalid` (the artifact is
wrong: bomb, truncation, sha256, fsck, another format than asked for), or
the registry's and storage's own errors.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, cast

import zstandard

from hypeman_images.disk.check import e2fsck_findings
from hypeman_images.disk.e2fsprogs import E2fsprogs
from hypeman_images.disk.fsck_erofs import FsckErofs, fsck_findings
from hypeman_images.errors import (
    DiskArtifactInvalid,
    LimitExceeded,
    TransientError,
)
from hypeman_images.fleet.artifact import Chunk, DiskArtifact
from hypeman_images.fleet.diskhash import DiskHash
from hypeman_images.fleet.recipe import DiskFormat
from hypeman_images.fsutil import (
    fsync_dir,
    is_storage_failure,
    storage_error,
    temp_name,
    writeback_thread,
)
from hypeman_images.oci.digest import Digest, VerifyingStream
from hypeman_images.oci.reference import Reference
from hypeman_images.registry.client import RegistryClient

log = logging.getLogger(__name__)

PIECE = 1024 * 1024  # what one read of an inflating chunk returns
MAX_WINDOW = 32 * 1024 * 1024  # zstd levels up to 19 use at most 8 MiB on any input
_FRAME_HEADER_MAX = 18  # ZSTD_FRAMEHEADERSIZE_MAX (RFC 8878 §3.1.1.1: 4 magic + 2..14)
_ZEROS = bytes(PIECE)


class _Stopped(Exception):
    """Another chunk failed: this one gives up quietly."""


# What a piece landing calls: its offset, its bytes, whether they are all zeros.
OnPiece = Callable[[int, bytes, bool], None]


@dataclass(frozen=True)
class _Check:
    """The checker of a fetched disk's format: its name, and what it finds (None: clean)."""

    name: str
    findings: Callable[[Path], str | None]


def _checker(artifact: DiskArtifact, tools: E2fsprogs | FsckErofs) -> _Check:
    """The check for ``artifact``'s format, which must be the one ``tools`` check."""
    fmt = artifact.config.format
    wanted = DiskFormat.EROFS if isinstance(tools, FsckErofs) else DiskFormat.EXT4
    if fmt != wanted:
        raise DiskArtifactInvalid(
            f"disk artifact {artifact.digest} is an {fmt} disk, not the {wanted} one asked for"
        )
    if isinstance(tools, FsckErofs):
        return _Check("fsck.erofs", lambda path: fsck_findings(tools, path))
    return _Check("e2fsck -fn", lambda path: e2fsck_findings(tools, path, 15))


@dataclass(frozen=True)
class FetchedDisk:
    """A fetched, verified disk in ``path``, a temp file beside ``dest``, until :meth:`commit`.

    Used as a context manager, the temp file is removed on leaving unless committed.
    """

    path: Path
    dest: Path
    artifact: DiskArtifact
    sha256: Digest

    def commit(self) -> Path:
        """Rename the disk into place at ``dest`` (and make the rename durable)."""
        try:
            os.replace(self.path, self.dest)
            fsync_dir(self.dest.parent)
        except OSError as exc:
            raise storage_error(exc, f"cannot move the fetched disk to {self.dest}") from exc
        return self.dest

    def discard(self) -> None:
        """Remove the temp file (nothing if it was committed)."""
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> FetchedDisk:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.discard()


def fetch_disk(
    client: RegistryClient,
    repository: Reference,
    artifact: DiskArtifact,
    dest: Path,
    tools: E2fsprogs | FsckErofs,
    *,
    parallel: int = 4,
    attempts: int = 3,
    max_disk_bytes: int | None = None,
) -> FetchedDisk:
    """Download ``artifact`` from ``repository`` into a verified temp disk beside ``dest``.

    ``artifact`` comes from :func:`fleet.lookup.find_disk` or
    :func:`fleet.lookup.read_artifact` (checked against its subject there).
    ``tools`` checks the disk: e2fsprogs for an ext4 artifact, ``fsck.erofs``
    for an EROFS one (an artifact of the other format is
    :class:`DiskArtifactInvalid`). The caller renames it into place
    (:meth:`FetchedDisk.commit`) once its record is ready. On any failure no
    temp file is left.
    """
    config = artifact.config
    check = _checker(artifact, tools)
    if max_disk_bytes is not None and config.disk_size > max_disk_bytes:
        raise LimitExceeded(
            f"disk artifact {artifact.digest} is a {config.disk_size}-byte disk, over the "
            f"{max_disk_bytes}-byte limit"
        )
    tmp = temp_name(dest)
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise storage_error(exc, f"cannot create a temp file in {dest.parent}") from exc
    try:
        with _closing(fd):
            os.ftruncate(fd, config.disk_size)
            sha256, findings = _fill(
                client, repository, artifact, (fd, tmp), check, max(1, parallel), attempts
            )
            if sha256 != config.disk_sha256:
                raise DiskArtifactInvalid(
                    f"disk artifact {artifact.digest}: the disk its chunks make hashes to "
                    f"{sha256}, not to the {config.disk_sha256} its config says"
                )
            if findings is not None:
                findings = findings.replace(str(tmp), "disk")  # the temp file is gone by then
                raise DiskArtifactInvalid(
                    f"disk artifact {artifact.digest}: {check.name} found problems {findings}"
                )
            os.fsync(fd)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if is_storage_failure(exc):
            raise storage_error(exc, f"cannot write the fetched disk {tmp}") from exc
        raise
    log.info("fetched disk artifact %s (%d bytes)", artifact.digest.short, config.disk_size)
    return FetchedDisk(tmp, dest, artifact, sha256)


@contextlib.contextmanager
def _closing(fd: int) -> Iterator[None]:
    try:
        yield
    finally:
        os.close(fd)


def _fill(
    client: RegistryClient,
    repository: Reference,
    artifact: DiskArtifact,
    disk: tuple[int, Path],
    check: _Check,
    parallel: int,
    attempts: int,
) -> tuple[Digest, str | None]:
    """Fetch every chunk into the temp disk; its sha256, and what ``check`` found in it.

    The check starts once every chunk is written and checked, while the
    calling thread may still be hashing the last pieces.
    """
    fd, path = disk
    stop = threading.Event()
    checking: list[Future[str | None]] = []
    with (
        ThreadPoolExecutor(1, thread_name_prefix="fetch-check") as checker,
        writeback_thread(fd, "fetch-writeback") as request,
    ):

        def writeback(chunk: Chunk) -> None:
            request(chunk.offset, chunk.size)

        def written() -> None:
            checking.append(checker.submit(check.findings, path))

        disk_hash = DiskHash(fd, [(c.offset, c.size) for c in artifact.chunks], on_written=written)
        with ThreadPoolExecutor(parallel, thread_name_prefix="fetch") as pool:
            futures = [
                pool.submit(
                    _fetch_chunk,
                    client,
                    repository,
                    (i, chunk),
                    fd,
                    stop,
                    attempts,
                    (disk_hash, writeback),
                )
                for i, chunk in enumerate(artifact.chunks)
            ]
            for future in futures:
                future.add_done_callback(lambda done: _stop_on_failure(done, disk_hash))
            try:
                sha256 = disk_hash.run()
                for future in futures:
                    future.result()
            except BaseException as caught:
                stop.set()
                disk_hash.fail()
                for future in futures:
                    future.cancel()
                pool.shutdown(wait=True)
                if not isinstance(caught, Exception):
                    raise  # an interrupt stays one
                raise _first_failure(futures) or caught from None
        [findings] = checking  # every chunk was sealed, so the check was started
        return sha256, findings.result()


def _stop_on_failure(future: Future[None], disk_hash: DiskHash) -> None:
    if not future.cancelled() and future.exception() is not None:
        disk_hash.fail()


def _first_failure(futures: list[Future[None]]) -> BaseException | None:
    """The first chunk's real error (not another chunk's "stopped" or "cancelled")."""
    for future in futures:
        if future.cancelled():
            continue
        error = future.exception()
        if error is not None and not isinstance(error, _Stopped | CancelledError):
            return error
    return None


def _fetch_chunk(
    client: RegistryClient,
    repository: Reference,
    numbered: tuple[int, Chunk],
    fd: int,
    stop: threading.Event,
    attempts: int,
    after: tuple[DiskHash, Callable[[Chunk], None]],
) -> None:
    """One chunk into place, fetched again after a transient failure (bounded)."""
    index, chunk = numbered
    disk_hash, writeback = after
    for attempt in range(1, attempts + 1):
        if stop.is_set():
            raise _Stopped
        try:
            token = disk_hash.restart(index)

            def landed(offset: int, piece: bytes, zeros: bool, token: int = token) -> None:
                disk_hash.landed(index, token, offset, piece, zeros)

            # A retry writes every block: zeros now may be where the last try wrote data.
            _inflate(client, repository, chunk, fd, stop, landed, skip_zeros=attempt == 1)
            disk_hash.sealed(index)
            writeback(chunk)  # this chunk's device writes, beside the next chunks
            return
        except TransientError as exc:
            if attempt == attempts:
                raise
            log.info("chunk at %d failed (%s); fetching it again", chunk.offset, exc)
        except BaseException:
            stop.set()
            raise


def _inflate(
    client: RegistryClient,
    repository: Reference,
    chunk: Chunk,
    fd: int,
    stop: threading.Event,
    landed: OnPiece,
    *,
    skip_zeros: bool,
) -> None:
    what = f"chunk {chunk.blob.digest.short} (bytes {chunk.offset}+{chunk.size})"
    with client.open_blob(repository, chunk.blob) as raw:
        stream = VerifyingStream(raw, chunk.blob.digest, chunk.blob.size)
        source = _Source(iter(stream))
        problem: str | None = None
        try:
            problem = _check_header(source, chunk)
            if problem is None:
                problem = _write(source, chunk, fd, (stop, landed), skip_zeros)
        except zstandard.ZstdError as exc:
            problem = f"is not valid zstd ({exc})"
        for _ in stream:  # the rest, for the digest: its verdict comes first
            pass
    stream.verify()
    if problem is not None:
        raise DiskArtifactInvalid(f"{what} {problem}")


def _check_header(source: _Source, chunk: Chunk) -> str | None:
    head = source.peek(_FRAME_HEADER_MAX)
    declared = zstandard.get_frame_parameters(head).content_size
    if declared == zstandard.CONTENTSIZE_UNKNOWN:
        return "declares no content size in its zstd frame header"
    if declared > chunk.size:
        return f"would inflate to {declared} bytes, past its declared {chunk.size}: a bomb"
    if declared < chunk.size:
        return f"is truncated: its zstd frame holds {declared} of its declared {chunk.size} bytes"
    return None


def _write(
    source: _Source,
    chunk: Chunk,
    fd: int,
    watch: tuple[threading.Event, OnPiece],
    skip_zeros: bool,
) -> str | None:
    """Inflate into place, each piece handed on once written; a reason if it inflates
    to more or fewer bytes than declared."""
    stop, landed = watch
    decompressor = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
    written = 0
    with decompressor.stream_reader(
        cast("IO[bytes]", source), read_size=PIECE, read_across_frames=False
    ) as frames:
        while piece := frames.read(PIECE):
            if stop.is_set():
                raise _Stopped
            if written + len(piece) > chunk.size:
                return f"inflates past its declared {chunk.size} bytes: a bomb"
            zeros = _is_zero(piece)
            if not (skip_zeros and zeros):
                _pwrite_all(fd, piece, chunk.offset + written)
            landed(chunk.offset + written, piece, zeros)
            written += len(piece)
    if written != chunk.size:
        return f"is truncated: it inflates to {written} of its declared {chunk.size} bytes"
    return None


def _is_zero(piece: bytes) -> bool:
    return piece == _ZEROS if len(piece) == PIECE else piece.count(0) == len(piece)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


class _Source:
    """A file-like ``read(n)`` over an iterator of byte chunks, with :meth:`peek`."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = b""

    def peek(self, size: int) -> bytes:
        while len(self._buffer) < size:
            more = next(self._chunks, None)
            if more is None:
                break
            self._buffer += more
        return self._buffer[:size]

    def read(self, size: int = -1) -> bytes:
        while not self._buffer:
            more = next(self._chunks, None)
            if more is None:
                return b""
            self._buffer = more
        if size < 0 or size >= len(self._buffer):
            out, self._buffer = self._buffer, b""
        else:
            out, self._buffer = self._buffer[:size], self._buffer[size:]
        return out


__all__ = ["MAX_WINDOW", "FetchedDisk", "fetch_disk"]
