"""Who may read the data dir (store/access.py): its owner, or one group; never everybody."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from support.pushed import PushedImage

from hypeman_images.build.manager import ImageManager
from hypeman_images.build.options import BuildOptions
from hypeman_images.store.access import GROUP_MODE, PRIVATE_MODE, exposure, prepare_data_dir
from hypeman_images.store.formats import DiskFormat

CLI = str(Path(sys.executable).with_name("hypeman-images"))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def another_group() -> int:
    """A group this process may give a file: any, as root; else one it belongs to."""
    if os.geteuid() == 0:
        return 4242
    groups = [g for g in os.getgroups() if g != os.getegid()]
    if not groups:
        pytest.skip("needs root or a second group")
    return groups[0]


def test_a_new_data_dir_is_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        prepare_data_dir(tmp_path / "a" / "data")
    finally:
        os.umask(old)
    assert mode(tmp_path / "a" / "data") == PRIVATE_MODE
    assert exposure(tmp_path / "a" / "data") is None


def test_a_group_data_dir_is_2750_and_the_groups(tmp_path: Path) -> None:
    group = another_group()
    prepare_data_dir(tmp_path / "data", group)
    info = (tmp_path / "data").stat()
    assert stat.S_IMODE(info.st_mode) == GROUP_MODE and info.st_gid == group
    # Asked again for a dir made private before: it is shared now.
    prepare_data_dir(tmp_path / "private")
    prepare_data_dir(tmp_path / "private", group)
    assert mode(tmp_path / "private") == GROUP_MODE


def test_an_existing_open_data_dir_is_left_alone_and_reported(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o755)
    prepare_data_dir(data)
    assert mode(data) == 0o755
    warning = exposure(data)
    assert warning is not None and "chmod o-rwx" in warning


@pytest.mark.parametrize("fmt", list(DiskFormat))
def test_nothing_a_pull_writes_is_readable_by_others(
    alpine_ref: PushedImage, tmp_path: Path, fmt: DiskFormat
) -> None:
    data = tmp_path / "data"
    with ImageManager(data) as manager:
        image = manager.pull(alpine_ref.ref, options=BuildOptions(format=fmt))
    assert image.disk.name == fmt.disk_name
    assert mode(data) == PRIVATE_MODE
    files = [p for p in data.rglob("*") if p.is_file() and not p.is_symlink()]
    assert image.disk in files and any("blobs" in p.parts for p in files)
    readable = [f"{p.relative_to(data)} {mode(p):04o}" for p in files if mode(p) & stat.S_IRWXO]
    assert readable == []


def test_the_cli_makes_the_data_dir_for_a_group(tmp_path: Path) -> None:
    group = another_group()
    data = tmp_path / "data"
    env = {**os.environ, "HYPEMAN_DATA_DIR_GROUP": str(group)}
    subprocess.run([CLI, "list", "--data-dir", str(data)], check=True, env=env, timeout=60)
    assert mode(data) == GROUP_MODE and data.stat().st_gid == group
    result = subprocess.run(
        [CLI, "list", "--data-dir", str(tmp_path / "other"), "--data-dir-group", "no-such-group"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "no group named 'no-such-group'" in result.stderr
