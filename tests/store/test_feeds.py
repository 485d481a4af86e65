"""Layers readable while they download (hypeman_images.store.feeds): a reader follows the writer."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from hypeman_images.oci.digest import Digest
from hypeman_images.store.feeds import FeedAborted, LayerFeeds

DIGEST = Digest("sha256", "ab" * 32)


def _read_all(feeds: LayerFeeds, out: list[bytes]) -> None:
    with feeds.open(DIGEST) as reader:
        while chunk := reader.read(7):
            out.append(chunk)


def test_a_reader_follows_the_download_and_ends_with_it(tmp_path: Path) -> None:
    feeds = LayerFeeds()
    got: list[bytes] = []
    reader = threading.Thread(target=_read_all, args=(feeds, got))
    reader.start()  # before the download begins: it waits for the file
    path = tmp_path / ".tmp-blob"
    with path.open("wb") as blob:
        feeds.begin(DIGEST, path)
        for part in (b"first part,", b" second", b" and the end"):
            time.sleep(0.05)
            assert reader.is_alive(), "the reader ended before the download did"
            blob.write(part)
            blob.flush()
            feeds.wrote(DIGEST, blob.tell())
    path.rename(tmp_path / "blob")  # verified and published: the reader's descriptor follows
    feeds.finish(DIGEST)
    reader.join(5)
    assert b"".join(got) == b"first part, second and the end"
    feeds.close()


def test_a_blob_says_its_ends_only_once_it_is_all_there(tmp_path: Path) -> None:
    feeds = LayerFeeds()
    assert feeds.ends(DIGEST) is None  # not begun
    path = tmp_path / ".tmp-blob"
    path.write_bytes(b"head and most of it")
    feeds.begin(DIGEST, path)
    feeds.wrote(DIGEST, 19)
    assert feeds.ends(DIGEST) is None  # more may come: the tail is not the blob's yet
    with path.open("ab") as blob:
        blob.write(b", tail")
    feeds.wrote(DIGEST, 25)
    feeds.finish(DIGEST)
    assert feeds.ends(DIGEST) == (b"head", b"tail", 25)
    feeds.close()
    assert feeds.ends(DIGEST) is None


def test_a_cached_blob_reads_at_once(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"cached bytes")
    feeds = LayerFeeds()
    feeds.cached(DIGEST, path)
    got: list[bytes] = []
    _read_all(feeds, got)
    assert b"".join(got) == b"cached bytes"
    feeds.close()


def test_a_failed_pull_fails_the_reader_waiting_for_bytes(tmp_path: Path) -> None:
    feeds = LayerFeeds()
    path = tmp_path / ".tmp-blob"
    path.write_bytes(b"")
    feeds.begin(DIGEST, path)
    failed: list[BaseException] = []

    def read() -> None:
        try:
            _read_all(feeds, [])
        except FeedAborted as exc:
            failed.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.05)
    feeds.abort(ConnectionError("registry went away"))
    reader.join(5)
    assert not reader.is_alive()
    assert len(failed) == 1 and "registry went away" in str(failed[0])
    with pytest.raises(FeedAborted):  # and any reader that comes later
        _read_all(feeds, [])
    feeds.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_blobs_all_there_hold_no_descriptor_only_their_readers_do(tmp_path: Path) -> None:
    """An image of many layers needs no descriptor per layer (tests/build/test_many_layers.py)."""
    feeds = LayerFeeds()
    before = _open_fds()
    digests = [Digest("sha256", f"{i:064x}") for i in range(50)]
    for i, digest in enumerate(digests):
        path = tmp_path / f"blob{i}"
        path.write_bytes(b"x" * i)
        if i % 2:
            feeds.cached(digest, path)
        else:
            feeds.begin(digest, path)
            feeds.wrote(digest, i)
            feeds.finish(digest, path)
    assert _open_fds() == before
    with feeds.open(digests[49]) as reader:
        assert reader.read() == b"x" * 49
        assert _open_fds() == before + 1
    assert _open_fds() == before
    assert feeds.ends(digests[48]) == (b"xxxx", b"xxxx", 48)
    assert _open_fds() == before
    feeds.close()
