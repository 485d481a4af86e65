"""Many layers: the files a build holds open do not grow with the layer count.

An image of 600 one-file layers is pulled by the CLI in a child process whose
open-file limit (``RLIMIT_NOFILE``) is 64, far fewer than its layers: cold
(every blob downloaded) and warm (every blob and scan cached), both ways of
building. Past ``Limits.max_layers`` the build is refused before any layer
is downloaded, naming that limit; and a process out of descriptors is told
so, not that its data dir is at fault.
"""

from __future__ import annotations

import errno
import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from support.disk import compare_trees, e2fsck_clean, read_disk_tree
from support.hostile import store_problems
from support.images import make_image, make_layer
from support.oracle import apply_layers
from support.push import push_image
from support.pushed import PushedImage
from support.registry import RegistryServer
from support.tar import directory, file

from hypeman_images.build.manager import ImageManager
from hypeman_images.build.options import BuildOptions
from hypeman_images.errors import LimitExceeded
from hypeman_images.fsutil import storage_error
from hypeman_images.layers.limits import Limits
from hypeman_images.store.images import ImageStatus

CLI = str(Path(sys.executable).with_name("hypeman-images"))
LAYERS = 600
# Far below one descriptor per layer; what the CLI needs besides (the interpreter,
# sockets, pipes to mke2fs, locks) fits with room to spare.
NOFILE = 64


@pytest.fixture(scope="module")
def many_layers(registry: RegistryServer) -> PushedImage:
    layers = [
        make_layer([directory("d"), file(f"d/f{i:03}", f"layer {i}\n".encode())])
        for i in range(LAYERS)
    ]
    image = make_image(layers, cmd=["/bin/true"])
    digest = push_image(registry.url, "many/layers", "v1", image)
    tree = apply_layers(layer.tar for layer in image.layers)
    return PushedImage(registry, "many/layers", "v1", digest, image, tree)


def _few_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


def _pull(data_dir: Path, ref: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, "pull", "--json", "--data-dir", str(data_dir), *args, ref],
        capture_output=True,
        text=True,
        preexec_fn=_few_files,
    )


@pytest.mark.parametrize("way", [(), ("--two-pass",)], ids=["one-pass", "two-pass"])
def test_hundreds_of_layers_build_within_a_few_open_files(
    many_layers: PushedImage, data_dir: Path, way: tuple[str, ...]
) -> None:
    ref = many_layers.ref
    for attempt in ("cold", "warm"):
        pulled = _pull(data_dir, ref, *way)
        assert pulled.returncode == 0, f"{attempt}: {pulled.stderr[-3000:]}"
        rootfs = Path(json.loads(pulled.stdout)["disk"])
        e2fsck_clean(rootfs)
        assert compare_trees(many_layers.expected_tree, read_disk_tree(rootfs)) == []
        assert store_problems(data_dir) == []
        # Again from the cache: the blobs (and their scans) are there, the disk is not.
        removed = subprocess.run(
            [CLI, "rm", "--data-dir", str(data_dir), ref], capture_output=True, text=True
        )
        assert removed.returncode == 0, removed.stderr


def test_more_layers_than_the_limit_are_refused_before_any_download(
    many_layers: PushedImage, data_dir: Path
) -> None:
    options = BuildOptions(limits=Limits(max_layers=LAYERS - 1))
    with ImageManager(data_dir, options=options) as manager:
        with pytest.raises(LimitExceeded) as caught:
            manager.pull(many_layers.ref)
        message = caught.value.message
        assert f"has {LAYERS} layers, over Limits.max_layers={LAYERS - 1}" in message
        [failed] = manager.list()
        assert failed.status is ImageStatus.FAILED and failed.error == message
    cached = {path.name for path in (data_dir / "cache/blobs/sha256").glob("*")}
    assert not cached & {layer.digest.removeprefix("sha256:") for layer in many_layers.image.layers}
    assert store_problems(data_dir) == []


def test_out_of_descriptors_says_so_and_not_that_the_data_dir_is_at_fault() -> None:
    exc = OSError(errno.EMFILE, "Too many open files")
    message = storage_error(exc, "cannot write /data/cache/blobs/x").message
    assert "too many open files" in message and "ulimit -n" in message
    assert "full" not in message and "permission" not in message
