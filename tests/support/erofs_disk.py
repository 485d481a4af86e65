"""Read an EROFS disk back into the oracle's ``dict[str, Node]`` form (``support.disk``: ext4).

As root the disk is loop-mounted read-only and walked with ``lstat`` (the
kernel reads it); otherwise :mod:`support.erofs_reader`, a reader written
from the kernel's sources and sharing no code with the writer, parses it.
:func:`kept_xattrs` is what the oracle's tree looks like after the xattr
policy, which both disk formats apply.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

from hypeman_images.layers.xattrs import XattrAction, xattr_action

from .disk import read_dir_tree
from .erofs_reader import read_image
from .oracle import Node


def read_erofs_tree(image: Path | str) -> dict[str, Node]:
    """The tree of an EROFS image: mounted if root, else parsed by the test reader."""
    return read_erofs_mounted(image) if os.geteuid() == 0 else read_erofs_parsed(image)


def read_erofs_mounted(image: Path | str) -> dict[str, Node]:
    """Loop-mount ``image`` read-only as erofs and walk it (needs root); always unmounts."""
    with tempfile.TemporaryDirectory(prefix="erofs-disk-") as mnt:
        subprocess.run(
            ["mount", "-t", "erofs", "-o", "loop,ro", str(image), mnt],
            check=True,
            capture_output=True,
        )
        try:
            return read_dir_tree(mnt)
        finally:
            subprocess.run(["umount", mnt], check=True, capture_output=True)


def read_erofs_parsed(image: Path | str) -> dict[str, Node]:
    """The tree as :func:`support.erofs_reader.read_image` parses it (no root needed)."""
    tree: dict[str, Node] = {}
    for path, n in read_image(image).tree.items():
        is_file = n.kind == "file"
        tree[os.fsdecode(path)] = Node(
            type=n.kind,  # type: ignore[arg-type]
            mode=n.mode,
            uid=n.uid,
            gid=n.gid,
            size=n.size if is_file else 0,
            sha256=n.sha256 if is_file else None,
            target=os.fsdecode(n.target) if n.target is not None else None,
            rdev=n.rdev,
            xattrs={os.fsdecode(k): v for k, v in n.xattrs},
            mtime=n.mtime,
            inode=n.nid,
        )
    return dict(sorted(tree.items()))


def kept_xattrs(tree: Mapping[str, Node]) -> dict[str, Node]:
    """``tree`` with the xattrs the policy drops (``layers.xattrs.XATTR_POLICY``) left out."""
    return {
        path: dataclasses.replace(
            node,
            xattrs={
                k: v for k, v in node.xattrs.items() if xattr_action(k) is not XattrAction.DROP
            },
        )
        for path, node in tree.items()
    }
