"""Tests of the shared test infrastructure in ``tests/support``."""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest
from support import registry as registry_module
from support.disk import compare_trees, e2fsck_clean, read_mounted, read_with_debugfs
from support.images import (
    BUSYBOX_GLIBC_DIGEST,
    IMAGES_DIR,
    OCI_MANIFEST,
    image_from_oci_layout,
    make_image,
    make_layer,
    sha256_digest,
)
from support.multilayer import CAP_NET_RAW, expected_multilayer_tree, multilayer_image
from support.oracle import Node, apply_layers, read_tar
from support.pushed import PushedImage
from support.registry import RegistryServer, htpasswd_auth, self_signed_cert, start_registry
from support.tar import (
    TarEntry,
    build_tar,
    char_device,
    directory,
    fifo,
    file,
    hardlink,
    opaque,
    symlink,
    whiteout,
)
from support.users import UnprivilegedUser

ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- registry -------------------------------------------------------------


def test_registry_serves_v2(registry: RegistryServer) -> None:
    response = httpx.get(f"{registry.url}/v2/")
    assert response.status_code == 200
    assert response.headers["docker-distribution-api-version"] == "registry/2.0"
    assert registry.host == f"127.0.0.1:{registry.port}"
    assert "delete" in registry.config_path.read_text()


def test_registry_retries_when_port_taken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    ports = iter([busy.getsockname()[1]])
    real = registry_module.free_port
    monkeypatch.setattr(registry_module, "free_port", lambda: next(ports, None) or real())
    try:
        with start_registry(tmp_path) as server:
            assert server.port != busy.getsockname()[1]
            assert httpx.get(f"{server.url}/v2/").status_code == 200
        assert "address already in use" in (tmp_path / "registry-0.log").read_text()
    finally:
        busy.close()


def test_registry_with_basic_auth_and_tls(tmp_path: Path) -> None:
    auth = htpasswd_auth(tmp_path, {"alice": "s3cret"})
    cert, key = self_signed_cert(tmp_path)
    with start_registry(tmp_path / "reg", auth=auth, tls=(cert, key)) as server:
        assert server.url.startswith("https://")
        trust = ssl.create_default_context(cafile=str(cert))
        anonymous = httpx.get(f"{server.url}/v2/", verify=trust)
        assert anonymous.status_code == 401
        assert anonymous.headers["www-authenticate"].startswith('Basic realm="test"')
        authed = httpx.get(f"{server.url}/v2/", verify=trust, auth=("alice", "s3cret"))
        assert authed.status_code == 200


def _fetch_manifest(pushed: PushedImage, reference: str) -> httpx.Response:
    url = f"{pushed.registry.url}/v2/{pushed.repository}/manifests/{reference}"
    response = httpx.get(url, headers={"Accept": ACCEPT})
    assert response.status_code == 200, response.text
    return response


def test_pushed_image_reads_back_byte_identical(multilayer_ref: PushedImage) -> None:
    image = multilayer_ref.image
    response = _fetch_manifest(multilayer_ref, multilayer_ref.tag)
    assert response.content == image.manifest
    assert response.headers["content-type"] == OCI_MANIFEST
    assert response.headers["docker-content-digest"] == image.manifest_digest
    for digest, blob in image.blobs.items():
        url = f"{multilayer_ref.registry.url}/v2/{multilayer_ref.repository}/blobs/{digest}"
        assert httpx.get(url, follow_redirects=True).content == blob
    assert multilayer_ref.ref == f"{multilayer_ref.registry.host}/test/multilayer:v1"


def test_busybox_layout_pushed_with_same_digests(busybox_ref: PushedImage) -> None:
    response = _fetch_manifest(busybox_ref, busybox_ref.tag)
    assert response.headers["docker-content-digest"] == BUSYBOX_GLIBC_DIGEST
    assert sha256_digest(response.content) == busybox_ref.manifest_digest
    layers = json.loads(response.content)["layers"]
    assert [d["digest"] for d in layers] == [layer.digest for layer in busybox_ref.image.layers]
    assert "/bin/busybox" in busybox_ref.expected_tree


def test_docker_media_types_and_index(registry: RegistryServer) -> None:
    layer = make_layer([file("hello", b"hi\n")], docker=True)
    image = make_image([layer], cmd=["/hello"], docker_media_types=True)
    manifest = json.loads(image.manifest)
    assert manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert manifest["layers"][0]["mediaType"].startswith("application/vnd.docker.image.rootfs")
    from support.images import make_index, push_index

    index = make_index([image], docker=True)
    digest = push_index(registry.url, "test/docker", "v1", index)
    pushed = PushedImage(registry, "test/docker", "v1", digest, image, {})
    got = _fetch_manifest(pushed, "v1")
    assert got.content == index.manifest
    assert _fetch_manifest(pushed, image.manifest_digest).content == image.manifest


def test_multiplatform_index(multiplatform_ref: PushedImage) -> None:
    assert multiplatform_ref.index is not None
    response = _fetch_manifest(multiplatform_ref, multiplatform_ref.tag)
    assert response.content == multiplatform_ref.index.manifest
    platforms = [m["platform"] for m in json.loads(response.content)["manifests"]]
    assert platforms == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux", "variant": "v8"},
    ]


def test_alpine_matches_docker_hub_facts(alpine_ref: PushedImage) -> None:
    config = alpine_ref.image.config_json
    assert config["config"]["Cmd"] == ["/bin/sh"]
    assert config["architecture"] == "amd64"
    tree = alpine_ref.expected_tree
    assert tree["/etc/shadow"].uid == 0 and tree["/etc/shadow"].gid == 42
    assert tree["/etc/shadow"].mode == 0o640
    assert (tree["/bin/sh"].type, tree["/bin/sh"].target) == ("symlink", "/bin/busybox")
    assert alpine_ref.image.layers[0].digest == sha256_digest(
        (IMAGES_DIR / "alpine-minirootfs-3.20.3-x86_64.tar.gz").read_bytes()
    )


# --- tar writer -----------------------------------------------------------


def test_tar_writer_keeps_binary_xattrs_big_ids_and_odd_names() -> None:
    long_name = "d/" + "x" * 150
    odd = b"odd \xff\n name"
    tar = build_tar(
        [
            file(
                "f", b"data", uid=3_000_000, gid=70_000, xattrs={"security.capability": CAP_NET_RAW}
            ),
            file(long_name, b""),
            file(odd, b""),
            symlink("l", "t" * 120),
        ]
    )
    members = [m for m, _ in read_tar(tar)]
    assert members[0].uid == 3_000_000 and members[0].gid == 70_000
    value = members[0].pax_headers["SCHILY.xattr.security.capability"]
    assert value.encode("utf-8", "surrogateescape") == CAP_NET_RAW
    assert members[1].name == long_name
    assert members[2].name.encode("utf-8", "surrogateescape") == odd
    assert members[3].linkname == "t" * 120
    listing = subprocess.run(["tar", "tvf", "-"], input=tar, capture_output=True, check=True)
    assert b"3000000/70000" in listing.stdout


# --- oracle ---------------------------------------------------------------


def _tree(*layers: list[TarEntry]) -> dict[str, Node]:
    return apply_layers(build_tar(entries) for entries in layers)


def _paths(*layers: list[TarEntry]) -> list[str]:
    return sorted(_tree(*layers))


ORACLE_CASES = {
    "whiteout-file": (
        [[file("a/x", b"1"), file("a/y", b"2")], [whiteout("a/x")]],
        ["/", "/a", "/a/y"],
    ),
    "whiteout-dir": (
        [[directory("a"), file("a/b/c", b"1")], [whiteout("a/b")]],
        ["/", "/a"],
    ),
    "whiteout-only-lower": (
        [[], [file("a/x", b"new"), whiteout("a/x")]],
        ["/", "/a", "/a/x"],
    ),
    "opaque-hides-lower-keeps-same-layer": (
        [
            [file("d/old", b"1"), file("d/sub/deep", b"2"), file("e", b"3")],
            [file("d/new", b"4"), opaque("d")],
        ],
        ["/", "/d", "/d/new", "/e"],
    ),
    "file-replaced-by-dir": (
        [[file("x", b"1")], [file("x/child", b"2")]],
        None,  # a path below a file is ambiguous in the spec: the oracle raises
    ),
    "dir-replaced-by-file-drops-children": (
        [[file("x/child", b"1")], [file("x", b"2")]],
        ["/", "/x"],
    ),
    "dir-replaced-by-symlink": (
        [[file("x/child", b"1")], [symlink("x", "/tmp")]],
        ["/", "/x"],
    ),
    "escaping-entries-dropped": (
        [[file("../../etc/evil", b"1"), file("a/../b", b"2"), file("/abs", b"3")]],
        ["/", "/abs", "/b"],
    ),
    "whiteout-cannot-climb": (
        [[file("a/x", b"1")], [file("a/.wh...", b"")]],
        ["/", "/a", "/a/x"],
    ),
}


@pytest.mark.parametrize("case", list(ORACLE_CASES), ids=list(ORACLE_CASES))
def test_oracle_paths(case: str) -> None:
    layers, expected = ORACLE_CASES[case]
    if expected is None:
        with pytest.raises(ValueError, match="not a directory"):
            _tree(*layers)
    else:
        assert _paths(*layers) == expected


def test_oracle_dir_over_dir_keeps_children_takes_metadata() -> None:
    tree = _tree(
        [directory("d", mode=0o755, uid=1, mtime=5), file("d/f", b"1")],
        [directory("d", mode=0o700, uid=2, mtime=9)],
    )
    assert "/d/f" in tree
    assert (tree["/d"].mode, tree["/d"].uid, tree["/d"].mtime) == (0o700, 2, 9)


def test_oracle_hardlink_keeps_old_content_when_target_replaced() -> None:
    tree = _tree(
        [file("a", b"old", mode=0o4755)],
        [hardlink("b", "a"), hardlink("c", "a")],
        [file("a", b"new")],
    )
    assert tree["/b"].sha256 == _sha(b"old") and tree["/b"].mode == 0o4755
    assert tree["/a"].sha256 == _sha(b"new")
    assert tree["/b"].inode == tree["/c"].inode != tree["/a"].inode


def test_oracle_hardlink_made_before_its_layer_whites_out_the_target_keeps_it() -> None:
    """Tar order, as docker applies a layer: the link comes while its target exists."""
    tree = _tree(
        [file("a", b"lower", mode=0o600), file("d/f", b"in d")],
        [hardlink("b", "a"), hardlink("e", "d/f"), whiteout("a"), whiteout("d")],
    )
    assert sorted(tree) == ["/", "/b", "/e"]
    assert tree["/b"].sha256 == _sha(b"lower") and tree["/b"].mode == 0o600
    assert tree["/e"].sha256 == _sha(b"in d")
    with pytest.raises(ValueError, match="no such non-directory"):  # the whiteout came first
        _tree([file("a", b"lower")], [whiteout("a"), hardlink("b", "a")])


def test_oracle_types_devices_and_root_metadata() -> None:
    tree = _tree(
        [
            directory("./", mode=0o700, mtime=7),
            char_device("dev/null", 1, 3, mode=0o666),
            fifo("run/pipe", mode=0o600),
            symlink("lnk", "dev/null"),
        ]
    )
    assert tree["/"].mode == 0o700 and tree["/"].mtime == 7
    assert tree["/dev/null"] == Node("char", 0o666, rdev=(1, 3), inode=tree["/dev/null"].inode)
    assert tree["/run/pipe"].type == "fifo"
    assert tree["/lnk"].target == "dev/null"
    assert tree["/dev"] == Node("dir", 0o755, inode=tree["/dev"].inode)  # implicit parent


def test_oracle_matches_handwritten_multilayer_tree() -> None:
    image, expected = multilayer_image()
    actual = apply_layers(layer.tar for layer in image.layers)
    assert compare_trees(expected, actual) == []
    assert not any(".wh." in path for path in actual)


def test_compare_trees_reports_fields_and_link_partitions() -> None:
    expected = expected_multilayer_tree()
    actual = dict(expected)
    actual["/etc/passwd"] = Node("file", 0o600, inode=1)
    del actual["/opt/other"]
    actual["/extra"] = Node("fifo", 0o644, inode=999)
    diffs = compare_trees(expected, actual)
    assert "/opt/other: missing" in diffs
    assert "/extra: unexpected fifo" in diffs
    assert "/etc/passwd: mode expected '0o644' vs actual '0o600'" in diffs
    assert any(d.startswith("/usr/bin/su: hard links expected") for d in diffs)


def test_image_from_layout_is_byte_identical() -> None:
    layout = IMAGES_DIR / "busybox-1.38.0-glibc-oci"
    image = image_from_oci_layout(layout)
    assert image.manifest_digest == BUSYBOX_GLIBC_DIGEST


# --- disk reader ----------------------------------------------------------

DISK_ENTRIES = [
    directory("./", mode=0o755, mtime=1000),
    directory("etc", mtime=1000),
    file("etc/shadow", b"root:*::0:::::\n", mode=0o640, gid=42, mtime=1000),
    # mke2fs -d - does not create missing parents ("cannot find directory"):
    # every directory comes before its children.
    directory("bin", mtime=1000),
    directory("dev", mtime=1000),
    directory("run", mtime=1000),
    file(
        "bin/ping",
        b"\x7fELF",
        mode=0o4755,
        uid=70_000,
        gid=3_000_000,
        mtime=1000,
        xattrs={"security.capability": CAP_NET_RAW},
    ),
    # mke2fs applies a hard-link header's owner/mode/mtime to the shared inode,
    # so the link header repeats the target's.
    hardlink("bin/ping2", "bin/ping", mode=0o4755, uid=70_000, gid=3_000_000, mtime=1000),
    symlink("bin/sh", "/bin/ping", mtime=1000),
    fifo("run/fifo", mode=0o600, mtime=1000),
    char_device("dev/null", 1, 3, mode=0o666, mtime=1000),
    directory("tmp", mode=0o1777, mtime=1000),
]


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    tar = build_tar(DISK_ENTRIES)
    image = tmp_path_factory.mktemp("disk") / "rootfs.ext4"
    with image.open("wb") as f:
        f.truncate(16 << 20)
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": "1000"}
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-b", "4096", "-d", "-", image],
        input=tar,
        check=True,
        env=env,
    )
    return image, tar


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="loop mount needs root")
def test_disk_reader_matches_oracle(small_disk: tuple[Path, bytes]) -> None:
    image, tar = small_disk
    e2fsck_clean(image)
    actual = read_mounted(image)
    assert "/lost+found" not in actual
    diffs = compare_trees(apply_layers([tar]), actual)
    assert diffs == []
    assert actual["/bin/ping"].xattrs == {"security.capability": CAP_NET_RAW}
    assert actual["/bin/ping"].inode == actual["/bin/ping2"].inode


def test_debugfs_reader_agrees_with_oracle(small_disk: tuple[Path, bytes]) -> None:
    image, tar = small_disk
    actual = read_with_debugfs(image)
    diffs = compare_trees(apply_layers([tar]), actual)
    assert diffs == []


def test_e2fsck_clean_reports_corruption(tmp_path: Path, small_disk: tuple[Path, bytes]) -> None:
    broken = tmp_path / "broken.ext4"
    data = bytearray(small_disk[0].read_bytes())
    data[1024 + 0x38 : 1024 + 0x3A] = b"\0\0"  # superblock magic
    broken.write_bytes(bytes(data))
    with pytest.raises(AssertionError, match="e2fsck -fn"):
        e2fsck_clean(broken)


# --- unprivileged user ----------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_unprivileged_user(unprivileged_user: UnprivilegedUser, tmp_path: Path) -> None:
    out = unprivileged_user.run(["id", "-u"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "65534"
    assert unprivileged_user.call(os.geteuid) == 65534
    with pytest.raises(PermissionError):
        unprivileged_user.call(Path("/root/forbidden").write_text, "x")
    unprivileged_user.own(tmp_path)
    unprivileged_user.call((tmp_path / "mine").write_text, "ok")
    assert (tmp_path / "mine").stat().st_uid == 65534
