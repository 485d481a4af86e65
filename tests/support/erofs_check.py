"""Write EROFS test images and check them three ways: fsck.erofs, our reader, the kernel.

A test describes the image as ``Item``s: an :class:`Entry` and, for a regular
file, its whole content (a sparse file's holes as zeros; the writer is given
only the fragments' bytes). :func:`expected` is what every reader must see;
:func:`check_image` runs ``fsck.erofs``, compares :mod:`support.erofs_reader`'s
listing and, as root, the loop-mounted tree read with ``lstat``, ``readlink``
and ``listxattr``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import stat
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from hypeman_images.disk.erofs import Entry, ErofsResult, ErofsWriter, Kind
from hypeman_images.oci.digest import Digest
from support.erofs_reader import Image, listing, read_image

SEED = Digest.of(b"erofs test seed")
IS_ROOT = os.geteuid() == 0
HASH_LIMIT = 64 << 20  # larger files are checked by reading ranges
Item = tuple[Entry, bytes | None]
_KIND = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}


def fragments(entry: Entry, content: bytes) -> bytes:
    """What the writer reads for a file: the content, or a sparse file's fragments."""
    if entry.sparse is None:
        return content
    return b"".join(content[o : o + n] for o, n in entry.sparse)


def write(items: Sequence[Item], path: Path, seed: Digest = SEED, **kw: int) -> ErofsResult:
    """Write ``items`` to a fresh image at ``path``; bodies alternate file objects and chunks."""
    with open(path, "wb+") as out:
        writer = ErofsWriter(out, seed, **kw)
        for i, (entry, content) in enumerate(items):
            body = None
            if content is not None and entry.kind is Kind.FILE:
                data = fragments(entry, content)
                body = io.BytesIO(data) if i % 2 else iter([data[:3], data[3:]])
            writer.add(entry, body)
        return writer.finish()


def _sha(content: bytes | None, size: int) -> str | None:
    return hashlib.sha256(content or b"").hexdigest() if size <= HASH_LIMIT else None


def expected(items: Sequence[Item]) -> dict[bytes, tuple[object, ...]]:
    """The listing every reader must produce (the form of ``erofs_reader.listing``)."""
    nodes: dict[bytes, Entry] = {}
    contents: dict[bytes, bytes | None] = {}
    links: dict[bytes, bytes] = {}
    for entry, content in items:
        path = b"/" + entry.path
        if entry.kind is Kind.HARDLINK:
            links[path] = b"/" + entry.target
            while links[path] in links:
                links[path] = links[links[path]]
        else:
            nodes[path], contents[path] = entry, content
    nlink: dict[bytes, int] = {}
    for target in links.values():
        nlink[target] = nlink.get(target, 1) + 1
    out = {}
    for path in [*nodes, *links]:
        owner = links.get(path, path)
        e, content = nodes[owner], contents[owner]
        kind = e.kind.value
        out[path] = (
            kind, e.mode, e.uid, e.gid, e.size if kind == "file" else 0, e.mtime, e.mtime_nsec,
            _sha(content, e.size) if kind == "file" else None,
            e.target if kind == "symlink" else None,
            (e.devmajor, e.devminor) if kind in ("char", "block") else None,
            tuple(sorted(e.xattrs)), nlink.get(owner, 1) if kind != "dir" else None,
        )  # fmt: skip
    return out


def fsck(image: Path) -> None:
    """``fsck.erofs`` must find the image clean: exit 0 and no error line (erofs-utils 1.5
    exits 0 after a superblock checksum error)."""
    result = subprocess.run(["fsck.erofs", str(image)], capture_output=True, text=True)
    said = result.stdout + result.stderr
    assert result.returncode == 0 and "<E>" not in said, said


@contextlib.contextmanager
def mounted(image: Path) -> Iterator[Path]:
    """The image loop-mounted read-only (root only)."""
    with tempfile.TemporaryDirectory(prefix="erofs-mnt-") as mnt:
        subprocess.run(["mount", "-t", "erofs", "-o", "loop,ro", str(image), mnt], check=True)
        try:
            yield Path(mnt)
        finally:
            subprocess.run(["umount", mnt], check=True)


def _mounted_node(path: bytes, counts: dict[int, int]) -> tuple[object, ...]:
    st = os.lstat(path)
    kind = _KIND[stat.S_IFMT(st.st_mode)]
    sha = None
    if kind == "file" and st.st_size <= HASH_LIMIT:
        with open(path, "rb") as f:
            sha = hashlib.file_digest(f, "sha256").hexdigest()
    names = sorted(os.listxattr(path, follow_symlinks=False))
    xattrs = tuple((os.fsencode(n), os.getxattr(path, n, follow_symlinks=False)) for n in names)
    counts[st.st_ino] = counts.get(st.st_ino, 0) + 1
    return (
        kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
        st.st_size if kind == "file" else 0, st.st_mtime_ns // 10**9, st.st_mtime_ns % 10**9,
        sha, os.readlink(path) if kind == "symlink" else None,
        (os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("char", "block") else None,
        tuple(sorted(xattrs)), st.st_nlink if kind != "dir" else None,
    )  # fmt: skip


def mounted_listing(mnt: Path) -> dict[bytes, tuple[object, ...]]:
    """The mounted tree in the listing's form, walked by name (so every lookup is tested)."""
    root = os.fsencode(mnt)
    counts: dict[int, int] = {}
    out = {b"/": _mounted_node(root, counts)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            full = os.path.join(dirpath, name)
            out[b"/" + os.path.relpath(full, root)] = _mounted_node(full, counts)
    return out


def check_image(image: Path, items: Sequence[Item]) -> Image:
    """fsck, then our reader and (as root) the kernel must both show exactly ``items``."""
    fsck(image)
    want = expected(items)
    read = read_image(image, hash_limit=HASH_LIMIT)
    assert listing(read.tree) == want
    if IS_ROOT:
        with mounted(image) as mnt:
            assert mounted_listing(mnt) == want
    return read
