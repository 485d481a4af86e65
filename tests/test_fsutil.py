"""Tree removal: iterative whatever the depth, never through a symlink, counting real bytes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from support.deep import make_deep_tree

from hypeman_images import fsutil
from hypeman_images.fsutil import discard, remove_tree

DEPTH = 3000  # past Python's recursion limit, and past PATH_MAX as a path ("dir/" * 3000)


def test_a_tree_deeper_than_the_recursion_limit_and_path_max_is_removed(tmp_path: Path) -> None:
    doomed = tmp_path / "doomed"
    make_deep_tree(doomed, DEPTH, leaf=b"x" * 8192)
    with pytest.raises(RecursionError):
        shutil.rmtree(doomed)  # what the store used: one stack frame per level
    freed = remove_tree(doomed)
    assert not doomed.exists()
    assert freed >= 8192
    assert os.listdir(tmp_path) == []


def test_symlinks_are_removed_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"keep")
    doomed = tmp_path / "doomed"
    (doomed / "a").mkdir(parents=True)
    (doomed / "a" / "to-dir").symlink_to(outside)
    (doomed / "to-file").symlink_to(outside / "keep")
    remove_tree(doomed)
    assert not doomed.exists()
    assert (outside / "keep").read_bytes() == b"keep"
    # A symlink given as the tree itself is the link, not its target.
    link = tmp_path / "link"
    link.symlink_to(outside)
    remove_tree(link)
    assert not link.is_symlink() and (outside / "keep").exists()


def test_bytes_freed_are_allocated_blocks_of_last_links(tmp_path: Path) -> None:
    doomed = tmp_path / "doomed"
    doomed.mkdir()
    with open(doomed / "sparse", "wb") as handle:
        handle.write(b"y" * 4096)
        handle.truncate(1 << 30)  # a 1 GiB disk image with one block written
    (doomed / "data").write_bytes(b"z" * (1 << 20))
    os.link(doomed / "data", tmp_path / "kept-link")  # still linked outside: frees nothing
    allocated = os.stat(doomed / "sparse").st_blocks * 512
    freed = remove_tree(doomed)
    assert allocated <= freed < 1 << 20
    assert (tmp_path / "kept-link").stat().st_size == 1 << 20


def test_read_only_directories_inside_are_removed(tmp_path: Path) -> None:
    doomed = tmp_path / "doomed"
    (doomed / "ro" / "sub").mkdir(parents=True)
    (doomed / "ro" / "sub" / "f").write_bytes(b"f")
    os.chmod(doomed / "ro" / "sub", 0o500)
    os.chmod(doomed / "ro", 0o500)
    remove_tree(doomed)
    assert not doomed.exists()


def test_missing_is_nothing_to_do(tmp_path: Path) -> None:
    assert remove_tree(tmp_path / "absent") == 0


def test_what_cannot_be_removed_is_quarantined(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    busy = tmp_path / "images" / "busy"
    busy.mkdir(parents=True)
    (busy / "f").write_bytes(b"f")
    quarantine = tmp_path / "quarantine"

    def refused(path: Path) -> int:  # as for a mount point or an immutable file inside
        raise PermissionError(1, "Operation not permitted", str(path))

    monkeypatch.setattr(fsutil, "remove_tree", refused)
    assert discard(busy, quarantine, "images/busy") == 0
    assert not busy.exists()
    [moved] = quarantine.iterdir()
    assert moved.name.endswith(".images_busy") and (moved / "f").read_bytes() == b"f"
