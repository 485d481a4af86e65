"""A three-layer image exercising every flattening rule, with its expected tree.

The expected tree is written out by hand (not computed by the oracle), so a
test can check the oracle against it and the pipeline against both.

Layer 1 lays down a small root; layer 2 whites out a file and a directory,
makes ``/var/cache`` opaque, replaces ``/etc/hostname``, hard-links
``/bin/sh`` to layer 1's ``/bin/busybox`` and ``/usr/bin/passwd`` to layer 1's
setuid ``/usr/bin/su``, and adds a symlink; layer 3 replaces
``/bin/busybox`` (``/bin/sh`` must keep the old content: go-containerregistry
#977) and turns the file ``/srv`` into a directory.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import replace
from typing import Any

from .images import Image, make_image, make_layer
from .oracle import Node
from .tar import TarEntry, directory, file, hardlink, opaque, symlink, whiteout

T = 1_700_000_000  # every entry's mtime
# VFS_CAP_REVISION_2 granting cap_net_raw (bit 13): binary, with NUL bytes.
CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")
BIG_UID = 3_000_000  # above 65535 and above the ustar octal limit (2^21): PAX
BIG_GID = 100_000


def _layers() -> tuple[list[TarEntry], list[TarEntry], list[TarEntry]]:
    one = [
        directory("./", mtime=T),
        directory("bin", mtime=T),
        file("bin/busybox", b"busybox v1\n", mode=0o755, mtime=T),
        directory("data", mtime=T),
        directory("data/gone", mtime=T),
        file("data/gone/child", b"child\n", mtime=T),
        file("data/kept", b"kept\n", mtime=T),
        directory("etc", mtime=T),
        file("etc/hostname", b"one\n", mtime=T),
        file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", mtime=T),
        directory("home", mtime=T),
        file("home/big", b"big ids\n", mode=0o600, uid=BIG_UID, gid=BIG_GID, mtime=T),
        directory("opt", mtime=T),
        file("opt/keep", b"keep\n", mtime=T),
        file("opt/other", b"other\n", mtime=T),
        file("srv", b"a file for now\n", mtime=T),
        directory("tmp", mode=0o1777, mtime=T),
        directory("usr", mtime=T),
        directory("usr/bin", mtime=T),
        file(
            "usr/bin/ping",
            b"ping\n",
            mode=0o755,
            mtime=T,
            xattrs={"security.capability": CAP_NET_RAW, "user.comment": b"\x00\xffraw"},
        ),
        file("usr/bin/su", b"su\n", mode=0o4755, mtime=T),
        file("usr/bin/wall", b"wall\n", mode=0o2755, gid=5, mtime=T),
        directory("var", mtime=T),
        directory("var/cache", mtime=T),
        file("var/cache/old", b"old\n", mtime=T),
        directory("var/cache/sub", mtime=T),
        file("var/cache/sub/deep", b"deep\n", mtime=T),
    ]
    two = [
        directory("bin", mtime=T + 1),
        hardlink("bin/sh", "bin/busybox", mode=0o755, mtime=T),
        directory("usr/bin", mtime=T),
        hardlink("usr/bin/passwd", "usr/bin/su", mode=0o4755, mtime=T),
        directory("data", mtime=T + 1),
        whiteout("data/gone"),
        directory("etc", mtime=T + 1),
        file("etc/hostname", b"two\n", mtime=T + 1),
        directory("lib", mtime=T + 1),
        file("lib/libc.so", b"libc\n", mtime=T + 1),
        symlink("lib/libc.so.6", "libc.so", mtime=T + 1),
        directory("opt", mtime=T + 1),
        whiteout("opt/keep"),
        directory("var/cache", mode=0o700, mtime=T + 1),
        opaque("var/cache"),
        file("var/cache/new", b"new\n", mtime=T + 1),
    ]
    three = [
        directory("bin", mtime=T + 2),
        file("bin/busybox", b"busybox v2\n", mode=0o755, mtime=T + 2),
        directory("srv", mode=0o750, mtime=T + 2),
        file("srv/index.html", b"<h1>hi</h1>\n", mtime=T + 2),
    ]
    return one, two, three


@functools.cache
def multilayer_image() -> tuple[Image, dict[str, Node]]:
    """The image (three gzip layers, OCI) and its expected final tree."""
    layers = [make_layer(entries) for entries in _layers()]
    image = make_image(layers, cmd=["/bin/sh"], env=["PATH=/usr/bin:/bin"])
    return image, expected_multilayer_tree()


def _f(content: bytes, mode: int = 0o644, mtime: int = T, inode: int = 0, **kw: Any) -> Node:
    sha = hashlib.sha256(content).hexdigest()
    return Node("file", mode, size=len(content), sha256=sha, mtime=mtime, inode=inode, **kw)


def _d(mode: int = 0o755, mtime: int = T) -> Node:
    return Node("dir", mode, mtime=mtime)


def expected_multilayer_tree() -> dict[str, Node]:
    """Hand-written final tree; ``inode`` 1 marks the one hard-link pair."""
    tree = {
        "/": _d(),
        "/bin": _d(mtime=T + 2),
        "/bin/busybox": _f(b"busybox v2\n", 0o755, T + 2),
        "/bin/sh": _f(b"busybox v1\n", 0o755),
        "/data": _d(mtime=T + 1),
        "/data/kept": _f(b"kept\n"),
        "/etc": _d(mtime=T + 1),
        "/etc/hostname": _f(b"two\n", mtime=T + 1),
        "/etc/passwd": _f(b"root:x:0:0:root:/root:/bin/sh\n"),
        "/home": _d(),
        "/home/big": _f(b"big ids\n", 0o600, uid=BIG_UID, gid=BIG_GID),
        "/lib": _d(mtime=T + 1),
        "/lib/libc.so": _f(b"libc\n", mtime=T + 1),
        "/lib/libc.so.6": Node("symlink", 0o777, target="libc.so", mtime=T + 1),
        "/opt": _d(mtime=T + 1),
        "/opt/other": _f(b"other\n"),
        "/srv": _d(0o750, T + 2),
        "/srv/index.html": _f(b"<h1>hi</h1>\n", mtime=T + 2),
        "/tmp": _d(0o1777),
        "/usr": _d(),
        "/usr/bin": _d(),
        "/usr/bin/ping": _f(
            b"ping\n",
            0o755,
            xattrs={"security.capability": CAP_NET_RAW, "user.comment": b"\x00\xffraw"},
        ),
        "/usr/bin/passwd": _f(b"su\n", 0o4755, inode=1),
        "/usr/bin/su": _f(b"su\n", 0o4755, inode=1),
        "/usr/bin/wall": _f(b"wall\n", 0o2755, gid=5),
        "/var": _d(),
        "/var/cache": _d(0o700, T + 1),
        "/var/cache/new": _f(b"new\n", mtime=T + 1),
    }
    # Every other path is its own inode: number them apart from the pair.
    return {
        path: node if node.inode else replace(node, inode=100 + i)
        for i, (path, node) in enumerate(tree.items())
    }
