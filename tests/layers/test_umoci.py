"""Our rootfs.ext4 against what a root-privileged ``umoci unpack`` makes of the same image.

umoci (Debian's 0.4.7, ``oci/layer/tar_extract.go``) is an independent,
careful implementation of image-spec ``layer.md``: for every image here the
tree inside our disk -- built by the full pipeline, pushed to the test
registry and pulled -- must equal the ``rootfs`` umoci unpacks from an OCI
image layout holding the very same blobs, path by path: type, mode, owner,
size, content, symlink target, device numbers, xattrs, mtimes and hard-link
groups.

Where the two differ the difference is listed in :data:`KNOWN` with the
reason, in the spec's words where it has any, so a new difference (or a known
one going away) fails the test. One rule applies to every image:
:func:`_implicit_dir_mtimes` (directories no layer contains).

Runs as root only (CI does): umoci needs it to chown, mknod and set
``trusted.*`` xattrs, and the disk is read by loop-mounting it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from support.cases import CASES, ERRORS, symlink_chain
from support.disk import compare_trees, e2fsck_clean, read_dir_tree, read_disk_tree
from support.images import BUSYBOX_GLIBC_LAYOUT, Image, make_image, make_layer, push_image
from support.oracle import Node, apply_layers
from support.pushed import PushedImage
from support.registry import RegistryServer
from support.tar import TarEntry, build_tar

from hypeman_images.build.manager import ImageManager
from hypeman_images.errors import LayerError

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="umoci must run as root to chown and mknod"),
    pytest.mark.skipif(shutil.which("umoci") is None, reason="needs umoci (Debian: umoci)"),
]

TAG = "test"
REF_NAME = "org.opencontainers.image.ref.name"

# The old GNU sparse type 'S': Go's archive/tar reads it (the header keeps typeflag
# 'S'), but umoci's UnpackEntry switch has no case for it ("unknown typeflag '\x53'").
# We read it as the regular file it is, like GNU tar and Python's tarfile do.
UMOCI_REFUSES_WE_READ = {"sparse_gnu_format": "unknown typeflag '\\x53'"}
# The symlink cases run twice more: 255 dereferences resolve in both, 256 fail in both.
COMPARED: dict[str, Sequence[Sequence[TarEntry]]] = {
    **{case: layers for case, layers in CASES.items() if case not in UMOCI_REFUSES_WE_READ},
    "symlink_chain_255": symlink_chain(255),
}
UMOCI_REFUSES = ("symlink_loop", "symlink_self_loop", "symlink_to_file_as_parent", "hop_limit")

# Differences we keep on purpose: case -> {compare_trees line (umoci = expected,
# ours = actual): why}. Each must show up exactly; anything else fails.
_MARKER_DIRS = (
    "a whiteout marker lives in its directory, so that directory is part of the layer: we "
    "create it as containerd and docker do (mkdirAll before the whiteout); umoci's "
    "ociWhiteout returns before its MkdirAll. layer.md is silent on markers in missing "
    "directories"
)
_SOCKET = (
    "a typeflag '0' header whose mode carries S_IFSOCK is a socket from the build host; "
    "layer.md lists sockets among the file types, but ustar has no socket typeflag and no "
    "extractor can recreate one (bind() makes it at run time). umoci and containerd write "
    "an empty regular file there, which would make a later bind() fail with EADDRINUSE; "
    "we skip the entry and log it, as GNU tar skips sockets ('socket ignored')"
)
_MARKERS_FIRST = (
    "layer.md 'Whiteouts': 'Whiteout files MUST only apply to resources in lower/parent "
    "layers' and the opaque marker 'is applied first, before creating the new version of "
    "a/b, regardless of the ordering in which the whiteout file was encountered'. So a "
    "layer's markers run before its other entries and resolve their directory in the "
    "lower layers only. umoci resolves each marker in tar order, through what the same "
    "layer made of the path just before, so its result depends on that order: with the "
    "marker before 'a/' (case whiteout_before_dir_replacing_symlink) it deletes real/x "
    "as we do, after it, not. The spec's order-independence decides for our reading"
)
KNOWN: dict[str, dict[str, str]] = {
    "whiteout_through_symlink_of_same_layer": {
        "/real/x: unexpected file": _MARKERS_FIRST,
        "/real/y: unexpected file": _MARKERS_FIRST,
    },
    "whiteout_in_dir_replacing_symlink": {"/real/x: missing": _MARKERS_FIRST},
    "devices_fifos": {"/dev/sock: missing": _SOCKET},
    "marker_implies_directory": {
        "/newdir: unexpected dir": _MARKER_DIRS,
        "/newdir/sub: unexpected dir": _MARKER_DIRS,
    },
    "whiteout_of_nothing": {
        "/no: unexpected dir": _MARKER_DIRS,
        "/no/such: unexpected dir": _MARKER_DIRS,
    },
}


def write_oci_layout(image: Image, layout: Path, tag: str) -> None:
    """An OCI image layout (image-spec ``image-layout.md``) holding ``image`` under ``tag``."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    for digest, data in {**image.blobs, image.manifest_digest: image.manifest}.items():
        (blobs / digest.removeprefix("sha256:")).write_bytes(data)
    descriptor = {
        "mediaType": image.manifest_media_type,
        "digest": image.manifest_digest,
        "size": len(image.manifest),
        "annotations": {REF_NAME: tag},
    }
    index = {"schemaVersion": 2, "manifests": [descriptor]}
    (layout / "index.json").write_text(json.dumps(index))


def umoci_unpack(image: Image, workdir: Path) -> subprocess.CompletedProcess[str]:
    """``umoci unpack`` as root (not ``--rootless``) into ``workdir/bundle``, umask 022."""
    write_oci_layout(image, workdir / "layout", TAG)
    command = ["umoci", "--log", "error", "unpack", "--image", f"{workdir / 'layout'}:{TAG}"]
    return subprocess.run(
        ["sh", "-c", 'umask 022 && exec "$@"', "sh", *command, str(workdir / "bundle")],
        capture_output=True,
        text=True,
    )


def umoci_tree(image: Image, workdir: Path) -> tuple[dict[str, Node], float]:
    """umoci's rootfs read like a mounted disk, and when the unpack started."""
    started = time.time()
    result = umoci_unpack(image, workdir)
    assert result.returncode == 0, f"umoci unpack failed:\n{result.stderr}"
    return read_dir_tree(workdir / "bundle" / "rootfs"), started


def _implicit_dir_mtimes(
    umoci: Mapping[str, Node], ours: Mapping[str, Node], since: float
) -> dict[str, Node]:
    """umoci's tree with the mtime of directories no layer contains set to ours (0).

    The root and every parent a layer implies without an entry of its own
    (``x/y`` for an entry ``x/y/z``, or ``usr/lib`` behind a dangling ``lib ->
    usr/lib``) have no header to take metadata from; layer.md leaves them
    undefined. umoci's ``MkdirAll`` stamps them with the time of the unpack, we
    with 0 so that a disk is a function of its image (containerd and docker
    make them ``0755 root:root`` too). Only that exact pair is forgiven.
    """
    out = dict(umoci)
    for path, node in umoci.items():
        mine = ours.get(path)
        if (
            node.type == "dir"
            and mine is not None
            and mine.type == "dir"
            and mine.mtime == 0
            and node.mtime >= int(since)
        ):
            out[path] = replace(node, mtime=0)
    return out


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageManager]:
    """One store for the module: every image here has its own repository and digest."""
    with ImageManager(tmp_path_factory.mktemp("umoci-data")) as images:
        yield images


def our_tree(manager: ImageManager, registry: RegistryServer, repo: str, image: Image) -> Path:
    """Push ``image`` and pull it through the whole pipeline; the disk's path."""
    push_image(registry.url, repo, TAG, image)
    return manager.pull(f"{registry.host}/{repo}:{TAG}").disk


def check_against_umoci(
    image: Image, disk: Path, workdir: Path, known: Mapping[str, str] | None = None
) -> None:
    e2fsck_clean(disk)
    ours = read_disk_tree(disk)
    theirs, started = umoci_tree(image, workdir)
    differences = compare_trees(_implicit_dir_mtimes(theirs, ours, started), ours)
    expected = sorted(known or {})
    assert sorted(differences) == expected, "\n".join(differences[:60])


def _image(stack: Sequence[Sequence[TarEntry]]) -> Image:
    return make_image([make_layer(list(layer)) for layer in stack])


@pytest.mark.parametrize("case", sorted(COMPARED))
def test_flatten_case(
    case: str, registry: RegistryServer, manager: ImageManager, tmp_path: Path
) -> None:
    image = _image(COMPARED[case])
    disk = our_tree(manager, registry, f"umoci/{case.replace('_', '-')}", image)
    check_against_umoci(image, disk, tmp_path, KNOWN.get(case))


@pytest.mark.parametrize("case", UMOCI_REFUSES)
def test_both_refuse(
    case: str, registry: RegistryServer, manager: ImageManager, tmp_path: Path
) -> None:
    """Symlink loops and symlinks to files as parents: umoci fails (ELOOP, ENOTDIR), we too."""
    layers, _, says = ERRORS[case]
    image = _image(layers)
    result = umoci_unpack(image, tmp_path)
    assert result.returncode != 0, "umoci unpacked it"
    assert any(errno in result.stderr for errno in ("too many levels", "not a directory"))
    with pytest.raises(LayerError, match=says):
        our_tree(manager, registry, f"umoci/{case.replace('_', '-')}", image)


@pytest.mark.parametrize("case", sorted(UMOCI_REFUSES_WE_READ))
def test_umoci_refuses_we_read(
    case: str, registry: RegistryServer, manager: ImageManager, tmp_path: Path
) -> None:
    """umoci fails; our disk holds what GNU tar and tarfile read (the oracle)."""
    image = _image(CASES[case])
    result = umoci_unpack(image, tmp_path)
    assert result.returncode != 0, "umoci unpacked it: compare with umoci instead"
    assert UMOCI_REFUSES_WE_READ[case] in result.stderr
    disk = our_tree(manager, registry, f"umoci/{case.replace('_', '-')}", image)
    e2fsck_clean(disk)
    want = apply_layers([build_tar(list(layer)) for layer in CASES[case]])
    assert compare_trees(want, read_disk_tree(disk), ignore_fields={"xattrs"}) == []


def test_alpine(alpine_ref: PushedImage, manager: ImageManager, tmp_path: Path) -> None:
    disk = manager.pull(alpine_ref.ref).disk
    check_against_umoci(alpine_ref.image, disk, tmp_path)


def test_busybox(busybox_ref: PushedImage, manager: ImageManager, tmp_path: Path) -> None:
    """The layout from Docker Hub, byte for byte (copied: umoci writes into a layout)."""
    disk = manager.pull(busybox_ref.ref).disk
    e2fsck_clean(disk)
    ours = read_disk_tree(disk)
    layout = shutil.copytree(BUSYBOX_GLIBC_LAYOUT, tmp_path / "layout")
    (entry,) = json.loads((layout / "index.json").read_text())["manifests"]
    tag = entry.get("annotations", {}).get(REF_NAME, "latest")
    started = time.time()
    command = ["umoci", "--log", "error", "unpack", "--image", f"{layout}:{tag}"]
    subprocess.run([*command, str(tmp_path / "bundle")], check=True, capture_output=True)
    theirs = read_dir_tree(tmp_path / "bundle" / "rootfs")
    assert compare_trees(_implicit_dir_mtimes(theirs, ours, started), ours) == []


def test_multilayer(multilayer_ref: PushedImage, manager: ImageManager, tmp_path: Path) -> None:
    disk = manager.pull(multilayer_ref.ref).disk
    check_against_umoci(multilayer_ref.image, disk, tmp_path)
