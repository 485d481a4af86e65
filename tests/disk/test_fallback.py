"""The older-e2fsprogs fallback through the whole pipeline: pull → stage → mke2fs -d DIR → debugfs.

The product is pointed at Debian 12's stock e2fsprogs 1.47.0 (``--mke2fs``,
through scripts that give the stock tools their own libext2fs), which has no
``mke2fs -d -``, so the build takes the path such an installation takes. Each
flatten case is pushed to the test registry, pulled by the product, and the
disk is read back with debugfs (no root, no mount) and compared with the
oracle, the slow model of layer.md that every other flatten test uses.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support import stock_e2fsprogs
from support.cases import CASES
from support.disk import compare_trees, e2fsck_clean, read_disk_tree, read_with_debugfs
from support.images import make_image, make_layer
from support.oracle import apply_layers
from support.push import push_image
from support.registry import RegistryServer
from support.tar import build_tar, directory, file

from hypeman_images.build.manager import ImageManager
from hypeman_images.build.options import BuildOptions
from hypeman_images.build.pipeline import BuildStats
from hypeman_images.disk.fallback import MAX_STAGED_DEPTH
from hypeman_images.errors import LimitExceeded
from hypeman_images.store.images import ImageStatus

# As in test_flatten: the oracle keeps sockets and unknown types and drops escaping
# paths, where we skip one and clamp the other; mke2fs and the merge check those.
ORACLE_DIFFERS = {"hostile_names", "devices_fifos", "whiteouts_stored_as_link_and_chardev"}
# Names the debugfs reader of the tests cannot list (a newline splits its output
# lines; the deep path's components overflow its columns): read by mounting (root).
NEEDS_MOUNT = {"odd_names", "deep_path"}


@pytest.fixture(scope="module")
def old_mke2fs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stock 1.47.0 mke2fs (and its siblings), as ``--mke2fs`` takes them."""
    return stock_e2fsprogs.wrappers(tmp_path_factory.mktemp("stock-e2fsprogs"))


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory, old_mke2fs: Path) -> ImageManager:
    options = BuildOptions(mke2fs=str(old_mke2fs))
    return ImageManager(tmp_path_factory.mktemp("fallback-data"), options=options)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(set(CASES) - ORACLE_DIFFERS))
def test_fallback_pipeline_gives_the_oracle_tree(
    case: str, registry: RegistryServer, manager: ImageManager
) -> None:
    layers = CASES[case]
    repo = f"fallback/{case.replace('_', '-')}"
    push_image(registry.url, repo, "v1", make_image([make_layer(list(layer)) for layer in layers]))
    stats = BuildStats()
    image = manager.pull(f"{registry.host}/{repo}:v1", stats=stats)
    # Built by the stock 1.47.0 tools, which cannot read tar: only the fallback could.
    assert "1.47.0" in image.record.tool_versions["e2fsprogs"]
    assert "one_pass_s" not in stats.stages
    e2fsck_clean(image.disk)
    if case in NEEDS_MOUNT:
        if os.geteuid() != 0:
            pytest.skip("built; the debugfs reader cannot list these names (root mounts)")
        got = read_disk_tree(image.disk)
    else:
        got = read_with_debugfs(image.disk)
    want = apply_layers([build_tar(list(layer)) for layer in layers])
    assert compare_trees(want, got, ignore_fields={"xattrs"}) == []
    if case == "xattrs":  # what the fallback's debugfs batch set, not only what tar carried
        ping, u = got["/ping"].xattrs, got["/u"].xattrs
        assert ping["security.capability"] == CASES[case][0][0].xattrs["security.capability"]
        assert (u["user.bin"], u["trusted.t"]) == (b"\x00\xff\x01", b"\xfe")


def _deep_image(registry: RegistryServer, depth: int, component: str) -> str:
    """An image whose tree is ``depth`` nested directories with a file at the bottom."""
    path = "/".join([component] * depth)
    entries = [directory("/".join([component] * n)) for n in range(1, depth + 1)]
    layer = make_layer([*entries, file(f"{path}/leaf", b"deep")])
    repo = f"fallback/deep-{depth}"
    push_image(registry.url, repo, "v1", make_image([layer]))
    return f"{registry.host}/{repo}:v1"


@pytest.mark.slow
def test_the_deepest_tree_the_fallback_allows_builds(
    registry: RegistryServer, manager: ImageManager
) -> None:
    # The leaf's path has MAX_STAGED_DEPTH components, of 3,581 bytes (flatten allows 4,096).
    image = manager.pull(_deep_image(registry, MAX_STAGED_DEPTH - 1, "level6"))
    assert "1.47.0" in image.record.tool_versions["e2fsprogs"]
    e2fsck_clean(image.disk)


@pytest.mark.slow
def test_a_tree_too_deep_for_the_fallback_is_refused_and_leaves_nothing(
    registry: RegistryServer, old_mke2fs: Path, tmp_path: Path
) -> None:
    # 1,500 levels: deeper than mke2fs -d DIR (1.47.0) survives and than Python's
    # recursion limit, which shutil.rmtree of the staging dir ran into.
    name = _deep_image(registry, 1500, "d")
    data = tmp_path / "data"
    with ImageManager(data, options=BuildOptions(mke2fs=str(old_mke2fs))) as manager:
        with pytest.raises(LimitExceeded, match=r"path of 513 components.*at most 512.*1\.47\.1"):
            manager.pull(name)
        [failed] = manager.list()
        assert failed.status is ImageStatus.FAILED
        build = data / "images" / failed.repository / failed.digest.removeprefix("sha256:")
        assert sorted(p.name for p in build.iterdir()) == [".lock", "metadata.json"]
        assert manager.gc().directories_removed == 1
        assert manager.list() == []
