"""build/erofs.py ``publish_erofs``: the sha256 starts on the image's head, and ends as its file's.

Both builds (one pass, two passes) hand their writer the ``on_head`` that
starts the hash while the metadata is written (docs/design.md, "EROFS
disks"); here the writer is driven directly, so a failure can be put in the
middle of ``finish``, after the hash has started. The pulls of
tests/build/test_erofs_builds.py and test_erofs_onepass.py check the
recorded digest of every disk they make against the file's.
"""

from __future__ import annotations

import errno
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import pytest
from support.erofs_check import SEED

from hypeman_images.build import erofs as build_erofs
from hypeman_images.build.erofs import publish_erofs
from hypeman_images.disk.erofs import Body, Entry, ErofsResult, Kind, data, write_erofs, writer
from hypeman_images.disk.filehash import THREAD_NAME
from hypeman_images.errors import StorageError

T = 1_700_000_000
OnHead = Callable[[int], None] | None


def small() -> Iterator[tuple[Entry, Body | None]]:
    yield Entry(b"", Kind.DIR, mode=0o755, mtime=T), None
    yield Entry(b"f", Kind.FILE, size=5, mtime=T), [b"hello"]


def many_dirs_and_a_sparse_file() -> Iterator[tuple[Entry, Body | None]]:
    """Metadata over many blocks; the data area ends in a chunked file's hole."""
    yield Entry(b"", Kind.DIR, mode=0o755, mtime=T), None
    for i in range(400):
        yield Entry(b"d%03d" % i, Kind.DIR, mode=0o755, mtime=T + i), None
        body = bytes([i % 251]) * (i * 37)
        yield Entry(b"d%03d/f" % i, Kind.FILE, size=len(body), mtime=T), [body]
    size = 5 << 30
    sparse = ((0, 4), (3 << 30, 9000), (size, 0))
    yield Entry(b"sparse", Kind.FILE, size=size, mtime=T, sparse=sparse), [b"head", b"m" * 9000]


TREES = {"small": small, "many-dirs-sparse": many_dirs_and_a_sparse_file}


def hashing_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME]


def sha256sum(path: Path) -> str:
    said = subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, check=True)
    return "sha256:" + said.stdout.split()[0]


@pytest.mark.parametrize("tree", list(TREES.values()), ids=list(TREES))
@pytest.mark.parametrize("compute_sha256", [True, False], ids=["sha256", "no-sha256"])
def test_the_recorded_sha256_is_the_published_files(
    tree: Callable[[], Iterator[tuple[Entry, Body | None]]], compute_sha256: bool, tmp_path: Path
) -> None:
    given: list[OnHead] = []

    def write(out: BinaryIO, timings: dict[str, float], on_head: OnHead) -> ErofsResult:
        given.append(on_head)
        return write_erofs(tree(), out, SEED, on_head=on_head)

    dest = tmp_path / "rootfs.erofs"
    disk = publish_erofs(dest, write, compute_sha256=compute_sha256, one_pass=False)
    assert [p.name for p in tmp_path.iterdir()] == ["rootfs.erofs"]
    assert disk.size_bytes == dest.stat().st_size and hashing_threads() == []
    if compute_sha256:
        assert given[0] is not None and disk.sha256 == sha256sum(dest)
    else:  # nothing hashed at all
        assert given == [None] and disk.sha256 is None


def test_no_sha256_starts_no_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(path: Path) -> None:
        raise AssertionError(f"{path} hashed with compute_sha256=False")

    monkeypatch.setattr(build_erofs, "FileHash", refused)

    def write(out: BinaryIO, timings: dict[str, float], on_head: OnHead) -> ErofsResult:
        return write_erofs(small(), out, SEED, on_head=on_head)

    disk = publish_erofs(tmp_path / "rootfs.erofs", write, compute_sha256=False, one_pass=True)
    assert disk.sha256 is None


def _fail_the_metadata(exc: BaseException) -> Callable[[pytest.MonkeyPatch, list[int]], None]:
    def plant(monkeypatch: pytest.MonkeyPatch, heads: list[int]) -> None:
        def meta_area(*args: object) -> bytes:
            assert heads, "the hash had not started"
            raise exc

        monkeypatch.setattr(writer, "meta_area", meta_area)

    return plant


def _fail_a_write_after_the_head(monkeypatch: pytest.MonkeyPatch, heads: list[int]) -> None:
    """The writer's own thread meets a full disk: finish raises from ``DataArea.flush``."""
    real = data.DataArea._write_at

    def write_at(area: data.DataArea, pos: int, chunk: bytes) -> None:
        if heads and pos >= heads[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(area, pos, chunk)

    monkeypatch.setattr(data.DataArea, "_write_at", write_at)


FAILURES: dict[str, tuple[Callable[[pytest.MonkeyPatch, list[int]], None], type[BaseException]]] = {
    "metadata-storage-error": (_fail_the_metadata(StorageError("disk full")), StorageError),
    "interrupted": (_fail_the_metadata(KeyboardInterrupt()), KeyboardInterrupt),
    "write-fails-on-the-writers-thread": (_fail_a_write_after_the_head, StorageError),
}


@pytest.mark.parametrize("failure", list(FAILURES.values()), ids=list(FAILURES))
def test_a_build_failing_in_finish_stops_the_hash_and_leaves_no_temp_file(
    failure: tuple[Callable[[pytest.MonkeyPatch, list[int]], None], type[BaseException]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plant, raised = failure
    heads: list[int] = []
    plant(monkeypatch, heads)

    def write(out: BinaryIO, timings: dict[str, float], on_head: OnHead) -> ErofsResult:
        assert on_head is not None

        def started(n: int) -> None:
            on_head(n)
            heads.append(n)

        return write_erofs(many_dirs_and_a_sparse_file(), out, SEED, on_head=started)

    with pytest.raises(raised):
        publish_erofs(tmp_path / "rootfs.erofs", write, compute_sha256=True, one_pass=True)
    assert heads and hashing_threads() == []
    assert list(tmp_path.iterdir()) == []
