"""The blob cache: an OCI image layout (image-spec ``image-layout.md``) shared by all images.

``<root>/oci-layout``, ``<root>/index.json`` and ``<root>/blobs/<alg>/<hex>``.
A blob is written under a temp name beside its final one while it streams
in, hashed on the way, fsynced, and renamed only when its digest matches, so a
blob that is visible is always complete and correct. Concurrent writers of the
same blob each use their own temp file; the rename makes the last one win
with identical bytes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from hypeman_images.errors import DigestMismatch, HypemanError, NotFound
from hypeman_images.fsutil import (
    TEMP_PREFIX,
    allocated_bytes,
    atomic_writer,
    own_directory,
    storage_error,
    write_atomic,
    writeback_thread,
    writer_alive,
)
from hypeman_images.oci.digest import Digest, VerifyingStream
from hypeman_images.oci.spec import OCI_INDEX, Descriptor
from hypeman_images.oci.wire import load_json
from hypeman_images.store.access import BLOB_MODE, FILE_MODE
from hypeman_images.store.feeds import LayerFeeds

log = logging.getLogger(__name__)

LAYOUT_VERSION = b'{"imageLayoutVersion":"1.0.0"}'
REF_NAME = "org.opencontainers.image.ref.name"
_WRITEBACK_EVERY = 16 << 20


@dataclass(frozen=True)
class GcResult:
    """What a garbage collection removed."""

    blobs_removed: int
    bytes_freed: int


class BlobStore:
    """Content-addressed blobs in an OCI image layout at ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        try:
            root.parent.mkdir(parents=True, exist_ok=True)
            for directory in (root, root / "blobs", root / "blobs" / "sha256"):
                own_directory(directory)  # never a symlink: gc deletes in them
            if not (root / "oci-layout").exists():
                write_atomic(root / "oci-layout", LAYOUT_VERSION)
            if not (root / "index.json").exists():
                self._write_index([])
        except OSError as exc:
            raise storage_error(exc, f"cannot create the blob cache at {root}") from exc

    def path(self, digest: Digest) -> Path:
        """Where the blob lives (whether or not it is there yet)."""
        return self.root / "blobs" / digest.algorithm / digest.encoded

    def has(self, digest: Digest) -> bool:
        """True if the verified blob is in the cache."""
        return self.path(digest).is_file()

    def open(self, digest: Digest) -> BinaryIO:
        """Open a cached blob for reading."""
        try:
            return open(self.path(digest), "rb")
        except FileNotFoundError as exc:
            raise NotFound(f"blob {digest} is not in the cache at {self.root}") from exc

    def read(self, digest: Digest) -> bytes:
        """A small cached blob's bytes (manifests, configs)."""
        with self.open(digest) as handle:
            return handle.read()

    def ingest(
        self,
        descriptor: Descriptor,
        chunks: Iterable[bytes],
        on_chunk: Callable[[int], None] | None = None,
        feeds: LayerFeeds | None = None,
    ) -> Path:
        """Stream ``chunks`` into the cache; the blob appears only once verified.

        Raises :class:`DigestMismatch` (and keeps nothing) when the bytes do not
        hash to ``descriptor.digest`` or their count differs from its size.
        ``feeds``: told where the bytes go and how far they are, for a reader
        that follows the download (:mod:`feeds`).
        """
        final = self.path(descriptor.digest)
        stream = VerifyingStream(chunks, descriptor.digest, descriptor.size)
        own_directory(final.parent)
        unsynced = written = 0
        digest = descriptor.digest
        with (
            atomic_writer(final, mode=BLOB_MODE) as handle,
            writeback_thread(handle.fileno(), "blob-writeback") as writeback,
        ):
            if feeds is not None:
                feeds.begin(digest, Path(handle.name))
            for chunk in stream:
                handle.write(chunk)
                written += len(chunk)
                if feeds is not None:
                    handle.flush()
                    feeds.wrote(digest, written)
                if on_chunk:
                    on_chunk(len(chunk))
                unsynced += len(chunk)
                if unsynced >= _WRITEBACK_EVERY:
                    # The blob's fsync then waits for its last MiBs only, not all of it.
                    handle.flush()
                    writeback(0, 0)
                    unsynced = 0
            stream.verify()
        return final

    def put(self, descriptor: Descriptor, data: bytes) -> Path:
        """Store an in-memory blob (a manifest or config) after verifying it."""
        return self.ingest(descriptor, [data])

    def verify(self, digest: Digest) -> None:
        """Re-hash a cached blob; remove it and raise :class:`DigestMismatch` if it rotted."""
        hasher = digest.hasher()
        with self.open(digest) as handle:
            while chunk := handle.read(1 << 20):
                hasher.update(chunk)
        if hasher.hexdigest() != digest.encoded:
            self.path(digest).unlink(missing_ok=True)
            raise DigestMismatch(f"cached blob {digest} is corrupt and was removed; pull again")

    def _alg_dirs(self) -> Iterator[Path]:
        """``blobs/<algorithm>`` directories; a symlink or a file there is not one of ours."""
        for alg_dir in sorted((self.root / "blobs").iterdir()):
            if alg_dir.is_dir() and not alg_dir.is_symlink():
                yield alg_dir

    def _temp_files(self) -> Iterator[Path]:
        for alg_dir in self._alg_dirs():
            yield from (p for p in alg_dir.iterdir() if p.name.startswith(TEMP_PREFIX))

    def digests(self) -> Iterator[Digest]:
        """Every blob in the cache: regular files named by their digest, nothing else.

        What gc may delete, so a name that is not a digest of its directory's
        algorithm, a symlink or a directory is never counted as a blob.
        """
        for alg_dir in self._alg_dirs():
            with os.scandir(alg_dir) as entries:
                names = sorted(e.name for e in entries if e.is_file(follow_symlinks=False))
            for name in names:
                try:
                    yield Digest.parse(f"{alg_dir.name}:{name}")
                except HypemanError:
                    continue  # not ours: left alone

    # index.json: the manifests images were pulled as, so the cache is a valid
    # layout that skopeo and umoci can read (`oci:<cache>:<ref>`).

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / ".lock", "a+b", opener=_private) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read_index(self) -> list[dict[str, Any]]:
        try:
            doc = load_json((self.root / "index.json").read_bytes())
            manifests = doc.get("manifests", [])
            return [m for m in manifests if isinstance(m, dict)]
        except (OSError, ValueError):
            log.warning("blob cache index.json unreadable; rebuilding it")
            return []

    def _write_index(self, manifests: list[dict[str, Any]]) -> None:
        doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
        write_atomic(self.root / "index.json", json.dumps(doc, indent=2).encode() + b"\n")

    def tag(self, descriptor: Descriptor, ref_name: str) -> None:
        """Record ``descriptor`` in index.json under ``ref_name`` (replacing that name)."""
        entry = descriptor.to_json()
        entry["annotations"] = {**entry.get("annotations", {}), REF_NAME: ref_name}
        with self._locked():
            manifests = [
                m for m in self._read_index() if m.get("annotations", {}).get(REF_NAME) != ref_name
            ]
            manifests.append(entry)
            self._write_index(manifests)

    def untag(self, ref_names: set[str]) -> None:
        """Drop index.json entries with these names."""
        with self._locked():
            manifests = self._read_index()
            kept = [m for m in manifests if m.get("annotations", {}).get(REF_NAME) not in ref_names]
            if len(kept) != len(manifests):
                self._write_index(kept)

    def sweep_ingest(self) -> int:
        """Remove partial downloads whose writer is gone (a crash); return bytes freed.

        Unlike :meth:`gc` it keeps every verified blob, so it is safe at startup.
        """
        freed = 0
        for stale in list(self._temp_files()):
            if not writer_alive(stale.name):
                with contextlib.suppress(FileNotFoundError):
                    info = stale.lstat()
                    stale.unlink()
                    freed += allocated_bytes(info)
        return freed

    def gc(self, keep: set[Digest]) -> GcResult:
        """Remove every blob not in ``keep`` and stale ingest files; report what was freed."""
        removed = freed = 0
        with self._locked():
            for digest in list(self.digests()):
                if digest in keep:
                    continue
                path = self.path(digest)
                with contextlib.suppress(FileNotFoundError):
                    info = path.lstat()
                    path.unlink()
                    freed += allocated_bytes(info)
                    removed += 1
            freed += self.sweep_ingest()
            manifests = self._read_index()
            kept = [m for m in manifests if _digest_in(m, keep)]
            if len(kept) != len(manifests):
                self._write_index(kept)
        return GcResult(removed, freed)


def _digest_in(entry: dict[str, Any], keep: set[Digest]) -> bool:
    try:
        return Digest.parse(str(entry.get("digest"))) in keep
    except HypemanError:
        return False


def _private(path: str, flags: int) -> int:
    """``open``'s opener for files made in the cache: never readable by others."""
    return os.open(path, flags, FILE_MODE)
