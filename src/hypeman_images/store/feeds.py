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

Descriptors are few whatever the number of layers: a feed holds one only
while its blob downloads, and each reader one of its own (a copy of the
feed's, or the blob opened by its path) until it is closed. An image of
thousands of layers needs no more of them than one of three
(tests/build/test_many_layers.py).
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
    fd: int = -1  # a read descriptor on the blob's temp file while it downloads
    written: int = 0
    done: bool = False  # every byte is there (the pull may not have verified them yet)
    path: Path | None = None  # the whole blob, once its descriptor is released


class LayerFeeds:
    """Each layer blob's bytes as far as they have arrived, for readers in other threads."""

    def __init__(self) -> None:
        self._feeds: dict[Digest, _Feed] = {}
        self._changed = threading.Condition()
        self._error: BaseException | None = None
        self._fds: set[int] = set()  # the downloads' descriptors; readers hold copies

    # -- the pull's side ---------------------------------------------------------------

    def begin(self, digest: Digest, path: Path) -> None:
        """The blob's bytes will be written to ``path`` (opened for reading now, before it
        can be renamed; the descriptor follows the file)."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        with self._changed:
            self._fds.add(fd)
            self._feeds[digest] = _Feed(fd)
            self._changed.notify_all()

    def wrote(self, digest: Digest, total: int) -> None:
        """``total`` bytes of the blob are in the file."""
        with self._changed:
            self._feeds[digest].written = total
            self._changed.notify_all()

    def finish(self, digest: Digest, path: Path | None = None) -> None:
        """The download is complete; with ``path``, the blob's place in the cache, where
        readers to come open it (the download's descriptor is released)."""
        with self._changed:
            feed = self._feeds[digest]
            feed.done = True
            if path is not None and feed.fd >= 0:
                self._fds.discard(feed.fd)
                os.close(feed.fd)
                feed.fd, feed.path = -1, path
            self._changed.notify_all()

    def cached(self, digest: Digest, path: Path) -> None:
        """The blob was in the cache already, at ``path`` (opened only by its readers)."""
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise FeedAborted(f"blob {digest}: cannot read {path}: {exc.strerror}") from exc
        with self._changed:
            self._feeds[digest] = _Feed(written=size, done=True, path=path)
            self._changed.notify_all()

    def abort(self, exc: BaseException) -> None:
        """The pull failed: every reader, waiting or to come, raises :class:`FeedAborted`."""
        with self._changed:
            self._error = exc
            self._changed.notify_all()

    def close(self) -> None:
        """Release the downloads' descriptors (each reader closes its own)."""
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
            if feed is None or not feed.done or self._error is not None:
                return None
            fd, size = self._descriptor(digest, feed), feed.written
        try:
            return BlobEnds(os.pread(fd, 4, 0), os.pread(fd, 4, max(0, size - 4)), size)
        finally:
            os.close(fd)

    def _read(self, reader: _Follow, buffer: memoryview) -> int:
        digest, offset = reader.digest, reader.offset
        with self._changed:
            while True:
                if self._error is not None:
                    raise FeedAborted(f"blob {digest}: its download failed: {self._error}")
                feed = self._feeds.get(digest)
                if feed is not None and (feed.written > offset or feed.done):
                    end = feed.written
                    if reader.fd < 0:
                        reader.fd = self._descriptor(digest, feed)
                    break
                self._changed.wait()
        # Outside the lock: the download goes on while this reads.
        want = min(len(buffer), end - offset)
        return os.preadv(reader.fd, [buffer[:want]], offset) if want > 0 else 0

    @staticmethod
    def _descriptor(digest: Digest, feed: _Feed) -> int:
        """A descriptor of the feed's blob for one reader, who closes it (under the lock)."""
        try:
            if feed.fd >= 0:
                return os.dup(feed.fd)
            assert feed.path is not None
            return os.open(feed.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise FeedAborted(f"blob {digest}: cannot read it: {exc.strerror}") from exc


class _Follow(io.RawIOBase):
    def __init__(self, feeds: LayerFeeds, digest: Digest) -> None:
        self._feeds = feeds
        self.digest = digest
        self.offset = 0
        self.fd = -1  # its own, opened at the first read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = self._feeds._read(self, memoryview(buffer).cast("B"))
        self.offset += n
        return n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        super().close()
