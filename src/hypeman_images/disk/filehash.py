"""A file's sha256, hashed in order on a thread of its own while the file is still written.

A disk's sha256 covers it from its first byte to its last, so a hash can only
follow its writer, and only over bytes that will not change again.
:class:`FileHash` hashes the leading bytes its writer says are final
(:meth:`FileHash.grow`) while the writer goes on past them, and the rest once
the file is complete (:meth:`FileHash.digest`). The EROFS writer knows its
superblock, in block 0, before it writes the metadata after the data area
(``disk.erofs.writer``), so the build hashes the data area while the
metadata is written, and the rest beside ``fsck.erofs`` (docs/design.md,
"EROFS disks").

It reads with ``os.preadv`` into one buffer of its own, so the file position
the writer uses is never moved; the read and ``hashlib``'s update of a large
slice both release the GIL, so the hash takes a core of its own.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from hypeman_images.errors import StorageError
from hypeman_images.fsutil import storage_error
from hypeman_images.oci.digest import Digest

SLICE = 8 << 20  # read and hashed at a time: few GIL hand-overs while the writer runs Python
THREAD_NAME = "file-sha256"


class FileHash:
    """The sha256 of the file at ``path``, which someone else writes front to back.

    :meth:`grow` says how many leading bytes are final (written, readable --
    a hole reads as zeros -- and never written again) and starts the hashing
    thread; :meth:`digest`, once the file is complete, hashes what is left up
    to its size and returns the sha256. :meth:`close` (``contextlib.closing``
    in a ``with``) stops the thread wherever it is and closes the file, so a
    build that fails leaves nothing running. One thread calls the methods.
    Raises :class:`StorageError` when the file cannot be read, or ends before
    the bytes said final.
    """

    def __init__(self, path: Path) -> None:
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise storage_error(exc, f"cannot open {path.name} to hash it") from exc
        self._name = path.name
        self._cond = threading.Condition()
        self._final = 0  # the leading bytes said final so far
        self._ended = False  # _final is the file's size
        self._stopped = False
        self._error: StorageError | None = None
        self._hash = hashlib.sha256()
        self._thread: threading.Thread | None = None

    def grow(self, final: int) -> None:
        """The first ``final`` bytes of the file are final: hash them, on the thread."""
        with self._cond:
            if self._stopped or self._ended:
                raise ValueError("FileHash.grow after digest or close")
            self._final = max(self._final, final)
            self._cond.notify_all()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
            self._thread.start()

    def digest(self) -> Digest:
        """The file is complete: hash the rest, up to its size now; its sha256."""
        try:
            size = os.fstat(self._fd).st_size
        except OSError as exc:
            raise storage_error(exc, f"cannot hash {self._name}") from exc
        if size < self._final:
            raise StorageError(f"{self._name} is {size} bytes, fewer than the {self._final} final")
        self.grow(size)
        with self._cond:
            self._ended = True
            self._cond.notify_all()
        assert self._thread is not None
        self._thread.join()
        if self._error is not None:
            raise self._error
        return Digest("sha256", self._hash.hexdigest())

    def close(self) -> None:
        """Stop the thread (at the next slice at most) and close the file; idempotent."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _run(self) -> None:
        view = memoryview(bytearray(SLICE))
        pos = 0
        while True:
            with self._cond:
                while pos == self._final and not (self._ended or self._stopped):
                    self._cond.wait()
                if self._stopped or pos == self._final:
                    return
                end = self._final
            try:
                n = os.preadv(self._fd, [view[: min(SLICE, end - pos)]], pos)
            except OSError as exc:
                self._error = storage_error(exc, f"cannot hash {self._name}")
                return
            if not n:
                self._error = StorageError(f"{self._name} ends at {pos}, before {end} bytes")
                return
            self._hash.update(view[:n])
            pos += n


__all__ = ["SLICE", "THREAD_NAME", "FileHash"]
