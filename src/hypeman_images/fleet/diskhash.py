"""The whole disk's sha256, fed in disk order while its chunks land in any order.

A fetch inflates several chunks at once (:mod:`.fetch`); the config's
``disk_sha256`` covers the disk in order, so one thread must hash it from
the first byte to the last. :class:`DiskHash` lets that thread follow the
chunks *as they land*, piece by piece, instead of waiting for each chunk to
finish and reading it back: the inflating threads hand over each piece they
wrote, and the hashing thread takes it from memory while :data:`HOLD` bytes
at most are held; a piece handed over beyond that (a chunk far ahead of the
hash) is read back from the temp file (the page cache) when its turn comes.
A piece of zeros costs no memory: zeros are hashed from a constant.

Pieces may be hashed before their chunk's blob digest is checked, so the
hash never moves past a chunk that is not *sealed* (its digest checked),
and a chunk fetched again after a transient failure puts the hash back to
the state it had at the chunk's start (a ``hashlib`` copy taken there): the
digest is always that of the checked chunks' bytes (docs/disk-artifacts.md,
"Fetching", step 6).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hypeman_images.oci.digest import Digest

HOLD = 4 * 1024 * 1024  # bytes of written pieces kept for the hash (the fetch's RSS target)
_ZEROS = bytes(1024 * 1024)


class HashStopped(Exception):
    """The fetch failed elsewhere: the hash gives up."""


@dataclass(frozen=True)
class _Piece:
    length: int
    data: bytes | None  # None: read it back from the file
    zeros: bool


class DiskHash:
    """The sha256 of a disk of ``chunks`` (``(offset, size)``, tiling it in order) in ``fd``.

    Inflating threads call :meth:`restart`, :meth:`landed` and :meth:`sealed`;
    one thread calls :meth:`run`. :meth:`fail` stops :meth:`run`.
    ``on_written`` is called (on the thread that sealed the last chunk) once
    every chunk is sealed: the disk is complete and checked, though maybe not
    hashed yet.
    """

    def __init__(
        self,
        fd: int,
        chunks: Sequence[tuple[int, int]],
        *,
        hold: int = HOLD,
        on_written: Callable[[], None] | None = None,
    ) -> None:
        self._fd = fd
        self._chunks = list(chunks)
        self._hold = hold
        self._on_written = on_written
        self._cond = threading.Condition()
        self._pieces: dict[int, _Piece] = {}
        self._held = 0
        self._sealed = [False] * len(self._chunks)
        self._unsealed = len(self._chunks)
        self._attempt = [0] * len(self._chunks)
        self._failed = False
        self._index = 0  # the chunk the hash is in
        self._pos = self._chunks[0][0] if self._chunks else 0
        self._hash = hashlib.sha256()
        self._checkpoint = self._hash.copy()  # the hash at the start of chunk ``_index``

    def restart(self, index: int) -> int:
        """Chunk ``index`` is being (re)written from its start; the attempt number to pass on."""
        with self._cond:
            self._attempt[index] += 1
            start, size = self._chunks[index]
            for offset in [o for o in self._pieces if start <= o < start + size]:
                self._drop(offset)
            if self._index == index:  # a piece being hashed now is dropped too (run)
                self._hash, self._pos = self._checkpoint.copy(), start
            return self._attempt[index]

    def landed(self, index: int, attempt: int, offset: int, piece: bytes, zeros: bool) -> None:
        """``piece`` is in the file at ``offset`` (or, if ``zeros``, a hole is there)."""
        with self._cond:
            if attempt != self._attempt[index]:
                return  # an earlier attempt's straggler
            keep = zeros or self._held + len(piece) <= self._hold
            if keep and not zeros:
                self._held += len(piece)
            self._pieces[offset] = _Piece(len(piece), piece if keep and not zeros else None, zeros)
            if offset == self._pos:
                self._cond.notify_all()

    def sealed(self, index: int) -> None:
        """Chunk ``index`` is whole and its digest was checked."""
        with self._cond:
            self._sealed[index] = True
            self._unsealed -= 1
            last = self._unsealed == 0
            self._cond.notify_all()
        if last and self._on_written is not None:
            self._on_written()

    def fail(self) -> None:
        """Stop :meth:`run` (another thread failed)."""
        with self._cond:
            self._failed = True
            self._cond.notify_all()

    def run(self) -> Digest:
        """Hash the disk in order as it lands: its sha256. :class:`HashStopped` after `fail`."""
        while True:
            with self._cond:
                piece = self._next()
                if piece is None:
                    return Digest("sha256", self._hash.hexdigest())
                hasher, offset = self._hash, self._pos
            self._feed(hasher, offset, piece)  # outside the lock: hashlib drops the GIL
            with self._cond:
                if hasher is self._hash and offset == self._pos:  # no restart meanwhile
                    self._pos += piece.length

    def _next(self) -> _Piece | None:
        """The piece at the hash's position, once there (lock held); None at the end."""
        while True:
            if self._failed:
                raise HashStopped
            start, size = self._chunks[self._index]
            if self._pos == start + size:  # the chunk's end: on only once it is sealed
                if self._sealed[self._index]:
                    if self._index + 1 == len(self._chunks):
                        return None
                    self._index += 1
                    self._checkpoint = self._hash.copy()
                    continue
            elif self._pos in self._pieces:
                return self._drop(self._pos)
            self._cond.wait()

    def _drop(self, offset: int) -> _Piece:
        piece = self._pieces.pop(offset)
        if piece.data is not None:
            self._held -= piece.length
        return piece

    def _feed(self, hasher: hashlib._Hash, offset: int, piece: _Piece) -> None:
        if piece.data is not None:
            hasher.update(piece.data)
        elif piece.zeros:
            view, left = memoryview(_ZEROS), piece.length
            while left:
                hasher.update(view[: min(left, len(_ZEROS))])
                left -= min(left, len(_ZEROS))
        else:
            done = 0
            while done < piece.length:
                data = os.pread(self._fd, piece.length - done, offset + done)
                if not data:
                    raise OSError(f"the temp disk ends at {offset + done}")
                hasher.update(data)
                done += len(data)


__all__ = ["HOLD", "DiskHash", "HashStopped"]
