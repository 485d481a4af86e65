"""EROFS disks through the product: ``pull --format erofs`` of every flatten case and real image.

Each disk must be clean for ``fsck.erofs`` (erofs-utils, a reader that is not
ours) and hold the tree the oracle makes of the layers (tests/support/oracle.py:
types, modes, owners, sizes, contents, link targets, devices, xattrs as the
policy keeps them, hard-link groups), read back by the kernel (loop mount, as
root) or by the independent reader of tests/support/erofs_reader.py. The same
digest gives the same bytes; a build as an unprivileged user gives exact owners;
the merge's refusals are the ext4 path's.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from support.cases import CASES, ERRORS, ONE_PASS_FALLS_BACK, Layers
from support.disk import compare_trees, read_disk_tree
from support.erofs_check import fsck
from support.erofs_disk import kept_xattrs, read_erofs_tree
from support.images import make_image, make_layer, push_image
from support.oracle import apply_layers
from support.pushed import PushedImage
from support.registry import RegistryServer
from support.tar import build_tar
from support.users import UnprivilegedUser

from hypeman_images.build.manager import ImageManager
from hypeman_images.build.options import BuildOptions
from hypeman_images.build.pipeline import BuildStats
from hypeman_images.store.formats import DiskFormat
from hypeman_images.store.images import ImageStatus, StoredImage

CLI = str(Path(sys.executable).with_name("hypeman-images"))
EROFS = BuildOptions(format=DiskFormat.EROFS)
# Cases whose layers are so small that their tar is more than 32 times their
# gzip (build/oneplan.py, ONE_PASS_MAX_RATIO): either way, built in two passes.
INFLATE_PAST_32X = {
    "empty_layers",
    "sparse_files",
    "sparse_gnu_format",
    "whiteouts_stored_as_link_and_chardev",
}
# The oracle keeps sockets and drops escaping paths (we skip one, clamp the other), as in
# tests/layers/test_flatten.py: these are compared with the ext4 disk of the same digest.
ORACLE_DIFFERS = {"hostile_names", "devices_fifos", "whiteouts_stored_as_link_and_chardev"}


def push_case(registry: RegistryServer, name: str, layers: Layers) -> str:
    image = make_image([make_layer(list(layer)) for layer in layers])
    push_image(registry.url, f"erofs/{name}", "v1", image)
    return f"{registry.host}/erofs/{name}:v1"


def cli_pull(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, "pull", "--data-dir", str(data_dir), *args], capture_output=True, text=True
    )


def check_erofs(disk: Path, expected: dict[str, object]) -> None:
    """fsck.erofs clean, and exactly the expected tree (xattrs as the policy keeps them)."""
    assert disk.name == "rootfs.erofs"
    fsck(disk)
    differences = compare_trees(kept_xattrs(expected), read_erofs_tree(disk))  # type: ignore[arg-type]
    assert differences == [], "\n".join(differences[:50])


def pull_erofs(data_dir: Path, ref: str, **options: object) -> tuple[StoredImage, BuildStats]:
    """An EROFS pull in process, and where its time went."""
    stats = BuildStats()
    with ImageManager(data_dir, options=replace(EROFS, **options)) as manager:  # type: ignore[arg-type]
        stored = manager.pull(ref, stats=stats)
    assert stored.record.format is DiskFormat.EROFS
    assert stored.record.status is ImageStatus.READY
    assert "erofs_s" in stats.stages
    digest = hashlib.sha256(stored.disk.read_bytes()).hexdigest()
    assert stored.record.disk_sha256 == f"sha256:{digest}"
    assert stored.record.size_bytes == stored.disk.stat().st_size
    return stored, stats


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_flatten_case(
    case: str, registry: RegistryServer, data_dir: Path, tmp_path: Path
) -> None:
    """Both ways, each checked against the oracle; the one pass taken where ext4's is."""
    ref = push_case(registry, case, CASES[case])
    one, stats = pull_erofs(data_dir, ref)
    two, two_stats = pull_erofs(tmp_path / "two", ref, one_pass=False)
    ext4_stats = BuildStats()
    with ImageManager(data_dir) as manager:  # ext4's one pass falls back in the same cases
        ext4 = manager.pull(ref, stats=ext4_stats)
    if case in ORACLE_DIFFERS:  # the ext4 disk of the same digest
        expected = read_disk_tree(ext4.disk)
    else:
        expected = apply_layers([build_tar(list(layer)) for layer in CASES[case]])
    falls_back = case in ONE_PASS_FALLS_BACK | INFLATE_PAST_32X
    assert ("one_pass_s" in ext4_stats.stages) is not falls_back
    assert ("one_pass_s" in stats.stages) is not falls_back
    assert ("one_pass_tried_s" in stats.stages) is falls_back
    assert one.record.one_pass is not falls_back and two.record.one_pass is False
    assert "one_pass_s" not in two_stats.stages and "one_pass_tried_s" not in two_stats.stages
    check_erofs(one.disk, expected)  # type: ignore[arg-type]
    check_erofs(two.disk, expected)  # type: ignore[arg-type]
    # The same bytes either way (no case names a regular file twice in a layer:
    # test_erofs_onepass.py has that one).
    assert one.disk.read_bytes() == two.disk.read_bytes()
    again, _ = pull_erofs(tmp_path / "again", ref)
    assert again.disk.read_bytes() == one.disk.read_bytes()


@pytest.mark.parametrize("one_pass", [True, False], ids=["one-pass", "two-pass"])
@pytest.mark.parametrize("case", sorted(ERRORS))
def test_the_merge_refuses_what_it_refuses_for_ext4(
    case: str, one_pass: bool, registry: RegistryServer, data_dir: Path
) -> None:
    layers, exc, text = ERRORS[case]
    ref = push_case(registry, f"refused-{case}", layers)
    with ImageManager(data_dir, options=replace(EROFS, one_pass=one_pass)) as manager:
        with pytest.raises(exc, match=text):
            manager.pull(ref)
        image = manager.get(ref, format=DiskFormat.EROFS)
    assert image.status is ImageStatus.FAILED and image.disk is None
    leftovers = {p.name for p in data_dir.rglob("*") if p.is_file()}
    assert not {n for n in leftovers if "rootfs" in n}, leftovers


def _real_images(request: pytest.FixtureRequest) -> PushedImage:
    image: PushedImage = request.getfixturevalue(request.param)
    return image


real_image = pytest.fixture(
    params=["alpine_ref", "busybox_ref", "multilayer_ref", "multiplatform_ref"],
    ids=["alpine", "busybox", "multilayer", "multiplatform"],
)(_real_images)


def test_real_images_are_exact_and_reproducible(real_image: PushedImage, tmp_path: Path) -> None:
    disks = []
    for name, way in (("one", ()), ("again", ()), ("two-pass", ("--two-pass",))):
        result = cli_pull(tmp_path / name, "--json", "--format", "erofs", *way, real_image.ref)
        assert result.returncode == 0, result.stderr
        doc = json.loads(result.stdout)
        disk = Path(doc["disk"])
        assert doc["format"] == "erofs" and doc["status"] == "ready"
        assert doc["disk_sha256"] == "sha256:" + hashlib.sha256(disk.read_bytes()).hexdigest()
        assert doc["size_bytes"] == disk.stat().st_size
        assert doc["tool_versions"] == {"hypeman-images": doc["tool_versions"]["hypeman-images"]}
        assert (disk.parent / "metadata.erofs.json").is_file()
        assert not (disk.parent / "metadata.json").exists()  # no ext4 was asked for
        disks.append(disk.read_bytes())
    check_erofs(disk, real_image.expected_tree)  # type: ignore[arg-type]
    assert disks[0] == disks[1] == disks[2]  # the one pass (if taken) and the two passes


def test_alpine_as_erofs_is_smaller_than_as_ext4(alpine_ref: PushedImage, data_dir: Path) -> None:
    with ImageManager(data_dir) as manager:
        ext4 = manager.pull(alpine_ref.ref)
        erofs = manager.pull(alpine_ref.ref, options=EROFS)
    assert ext4.directory == erofs.directory
    assert erofs.disk.stat().st_size <= 0.95 * ext4.disk.stat().st_size
    tree = read_erofs_tree(erofs.disk)
    assert (tree["/etc/shadow"].uid, tree["/etc/shadow"].gid, tree["/etc/shadow"].mode) == (
        0,
        42,
        0o640,
    )
    assert compare_trees(read_disk_tree(ext4.disk), tree) == []


def test_unprivileged_pull_keeps_owners(
    real_image: PushedImage, tmp_path: Path, unprivileged_user: UnprivilegedUser
) -> None:
    pushed = real_image
    with unprivileged_user.cli_pull(CLI, "--format", "erofs", pushed.ref) as result:
        assert result.returncode == 0, result.stderr
        disk = Path(result.stdout.strip())
        assert disk.stat().st_uid == 65534
        check_erofs(disk, pushed.expected_tree)  # type: ignore[arg-type]
        # Built by nobody or by root, the same bytes.
        again = cli_pull(tmp_path / "root-data", "--format", "erofs", pushed.ref)
        assert again.returncode == 0, again.stderr
        assert Path(again.stdout.strip()).read_bytes() == disk.read_bytes()
