"""Directory trees deeper than PATH_MAX and Python's recursion limit, made without paths."""

from __future__ import annotations

import os
from pathlib import Path

_DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


def make_deep_tree(root: Path, depth: int, name: str = "dir", leaf: bytes = b"leaf") -> None:
    """``root/name/name/…`` ``depth`` levels down, with a file ``leaf`` at the bottom.

    Each level is made relative to its parent's descriptor, so the depth is not
    limited by the length of a path.
    """
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, _DIR_OPEN)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, _DIR_OPEN, dir_fd=fd)
            os.close(fd)
            fd = child
        out = os.open("leaf", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
        try:
            os.write(out, leaf)
        finally:
            os.close(out)
    finally:
        os.close(fd)
