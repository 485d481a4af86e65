"""Layers readable while they download: the one-pass build starts before the pull ends.

The one-pass build (:mod:`layers.onepass`) reads the layers top first, each
once, from start to end: nothing it needs comes from the end of a blob, so it
can follow a download as the bytes land in the blob cache's temp file, a few
MiB behind the network, instead of waiting for the last layer.

:class:`LayerFeeds` is the meeting point. The pull says where each layer's
bytes are (:meth:`begin`, :meth:`wrote`, :meth:`finish`, :meth:`cached`) or
that they will not come (:meth:`fail`, :meth:`abort`); :meth:`open` gives the
build a reader that blocks until the next bytes are there, and raises if the
download failed. The bytes are unverified until the pull returns: the build
reads them like any hostile input, and its disk is kept only if the pull
verified every digest (the caller's gate: ``build.onepass.PullEnd``).
"""

from __future__ import annotations

import io
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple, cast

from hypeman_images.errors import HypemanError
from hypeman_images.oci.digest import Digest


class FeedAborted(HypemanError):
    """A layer's bytes will not come: its download, or the pull, failed."""


class BlobEnds(NamedTuple):
    """A whole blob's first and last 4 bytes (fewer if it is shorter) and its size."""

    head: bytes
    tail: bytes
    size: int


@dataclass
class _Feed:
    fd: int = -1  # a read descriptor on the blob's temp file (then the blob)
    written: int = 0
    done: bool = False  # every byte is there (the pull may not have verified them yet)


class LayerFeeds:
    """Each layer blob's bytes as far as they have arrived, for readers in other threads."""

    def __init__(self) -> None:
        self._feeds: dict[Digest, _Feed] = {}
        self._changed = threading.Condition()
        self._error: BaseException | None = None
        self._fds: list[int] = []  # closed by close() only: a reader may be using one

    # -- the pull's side ---------------------------------------------------------------

    def begin(self, digest: Digest, path: Path) -> None:
        """The blob's bytes will be written to ``path`` (opened for reading now, before it
        can be renamed; the descriptor follows the file)."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        with self._changed:
            self._fds.append(fd)
            self._feeds[digest] = _Feed(fd)
            self._changed.notify_all()

    def wrote(self, digest: Digest, total: int) -> None:
        """``total`` bytes of the blob are in the file."""
        with self._changed:
            self._feeds[digest].written = total
            self._changed.notify_all()

    def finish(self, digest: Digest) -> None:
        """The download is complete."""
        with self._changed:
            self._feeds[digest].done = True
            self._changed.notify_all()

    def cached(self, digest: Digest, path: Path) -> None:
        """The blob was in the cache already, at ``path``."""
        self.begin(digest, path)
        with self._changed:
            feed = self._feeds[digest]
            feed.written, feed.done = os.fstat(feed.fd).st_size, True
            self._changed.notify_all()

    def abort(self, exc: BaseException) -> None:
        """The pull failed: every reader, waiting or to come, raises :class:`FeedAborted`."""
        with self._changed:
            self._error = exc
            self._changed.notify_all()

    def close(self) -> None:
        """Release the descriptors, once every reader is done."""
        self.abort(FeedAborted("the build ended"))
        with self._changed:
            for fd in self._fds:
                os.close(fd)
            self._fds.clear()
            self._feeds.clear()

    # -- the build's side --------------------------------------------------------------

    def open(self, digest: Digest) -> BinaryIO:
        """A reader of the blob from its first byte, waiting for the bytes still to come."""
        return cast(BinaryIO, io.BufferedReader(_Follow(self, digest), 1 << 20))

    def ends(self, digest: Digest) -> BlobEnds | None:
        """The blob's first and last 4 bytes and its size, if all its bytes are there."""
        with self._changed:
            feed = self._feeds.get(digest)
            if feed is None or feed.fd < 0 or not feed.done or self._error is not None:
                return None
            fd, size = feed.fd, feed.written
        return BlobEnds(os.pread(fd, 4, 0), os.pread(fd, 4, max(0, size - 4)), size)

    def _read(self, digest: Digest, offset: int, buffer: memoryview) -> int:
        with self._changed:
            while True:
                if self._error is not None:
                    raise FeedAborted(f"blob {digest}: its download failed: {self._error}")
                feed = self._feeds.get(digest)
                if feed is not None and feed.fd >= 0 and (feed.written > offset or feed.done):
                    fd, end = feed.fd, feed.written
                    break
                self._changed.wait()
        # Outside the lock: the download goes on while this reads.
        want = min(len(buffer), end - offset)
        return os.preadv(fd, [buffer[:want]], offset) if want > 0 else 0


class _Follow(io.RawIOBase):
    def __init__(self, feeds: LayerFeeds, digest: Digest) -> None:
        self._feeds = feeds
        self._digest = digest
        self._offset = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = self._feeds._read(self._digest, self._offset, memoryview(buffer).cast("B"))
        self._offset += n
        return n
