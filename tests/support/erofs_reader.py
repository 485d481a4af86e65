"""An independent reader of EROFS images, for checking what the writer made.

Written from the kernel's format definition (``fs/erofs/erofs_fs.h``) and
its readers (``super.c``, ``inode.c``, ``dir.c``, ``namei.c``, ``xattr.c``,
``data.c``), not from the writer: it shares no code with
``hypeman_images.disk.erofs``. It is strict: anything the kernel would
refuse, or that would make a lookup fail, raises :class:`CorruptImage`:
a bad checksum, unknown features, inline data across a block, unsorted or
misplaced directory entries, wrong ``.``/``..``, a file type that disagrees
with the inode, an nlink that does not match the tree.
"""

from __future__ import annotations

import hashlib
import mmap
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

BLOCK = 4096
_ZERO = bytes(1 << 20)
_KINDS = {
    0o100000: "file",
    0o040000: "dir",
    0o120000: "symlink",
    0o020000: "char",
    0o060000: "block",
    0o010000: "fifo",
    0o140000: "socket",
}
_FT = {"file": 1, "dir": 2, "char": 3, "block": 4, "fifo": 5, "socket": 6, "symlink": 7}
_PREFIX = {
    1: b"user.",
    2: b"system.posix_acl_access",
    3: b"system.posix_acl_default",
    4: b"trusted.",
    6: b"security.",
}


class CorruptImage(Exception):
    """The image breaks a rule of the format (the message says which)."""


@dataclass(frozen=True)
class Inode:
    """One inode as read; ``nid`` ties hard links together."""

    kind: str
    mode: int  # permission bits
    uid: int
    gid: int
    size: int
    mtime: int
    mtime_nsec: int
    nlink: int
    nid: int
    extended: bool
    layout: int  # 0 flat plain, 2 flat inline, 4 chunk based
    sha256: str | None = None
    target: bytes | None = None
    rdev: tuple[int, int] | None = None
    xattrs: tuple[tuple[bytes, bytes], ...] = ()
    data_blocks: int = 0  # blocks the file's data takes outside its inode's record
    xattr_size: int = 0  # bytes of the inline xattr body (header, shared ids, entries)


@dataclass
class Image:
    """A whole image: the superblock's fields and every path (``b"/"`` the root)."""

    root_nid: int
    build_time: int
    build_time_nsec: int
    blocks: int
    uuid: bytes
    inos: int
    feature_incompat: int
    tree: dict[bytes, Inode] = field(default_factory=dict)


def crc32c_linux(data: bytes, crc: int = 0xFFFFFFFF) -> int:
    """Linux's ``crc32c(seed, data)``: no final inversion. Bit by bit, on purpose."""
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc


class _Reader:
    def __init__(self, data: bytes | mmap.mmap) -> None:
        self.d = data
        sb = data[1024:1152]
        (magic, csum, _compat, bits, extslots, self.root_nid, self.inos) = struct.unpack_from(
            "<IIIBBHQ", sb, 0
        )
        if magic != 0xE0F5E1E2 or bits != 12 or extslots:
            raise CorruptImage(f"superblock: magic {magic:#x}, blkszbits {bits}")
        zeroed = bytes(sb[:4]) + b"\0\0\0\0" + bytes(data[1032:BLOCK])
        if crc32c_linux(zeroed) != csum:
            raise CorruptImage("superblock checksum mismatch")
        (self.build_time, self.build_nsec, self.blocks, self.meta, self.xattr_blk) = (
            struct.unpack_from("<qIIII", sb, 24)
        )
        self.uuid = bytes(sb[48:64])
        (self.incompat,) = struct.unpack_from("<I", sb, 80)
        if self.incompat & ~0x4:
            raise CorruptImage(f"unexpected incompat features {self.incompat:#x}")
        if len(data) != self.blocks * BLOCK:
            raise CorruptImage(f"image is {len(data)} bytes, superblock says {self.blocks} blocks")

    # -- inodes ------------------------------------------------------------------

    def inode(self, nid: int) -> _Raw:
        pos = self.meta * BLOCK + nid * 32
        (fmt,) = struct.unpack_from("<H", self.d, pos)
        if fmt & ~0xF:
            raise CorruptImage(f"nid {nid}: i_format {fmt:#x}")
        extended, layout = fmt & 1, (fmt >> 1) & 7
        if extended:
            (_, icount, mode, _, size, i_u, _ino, uid, gid, mtime, nsec, nlink) = (
                struct.unpack_from("<HHHHQIIIIqII", self.d, pos)
            )
        else:
            (_, icount, mode, nlink, size, _, i_u, _ino, uid, gid) = struct.unpack_from(
                "<HHHHIIIIHH", self.d, pos
            )
            mtime, nsec = self.build_time, self.build_nsec
        kind = _KINDS.get(mode & 0o170000)
        if kind is None or layout not in (0, 2, 4):
            raise CorruptImage(f"nid {nid}: mode {mode:o}, layout {layout}")
        xsize = 0 if icount == 0 else 12 + 4 * (icount - 1)
        head = Inode(
            kind, mode & 0o7777, uid, gid, size, mtime, nsec, nlink, nid, bool(extended), layout
        )
        return _Raw(head, pos, 64 if extended else 32, xsize, i_u)

    def xattrs(self, ino: _Raw) -> tuple[tuple[bytes, bytes], ...]:
        if not ino.xsize:
            return ()
        pos = ino.pos + ino.isize
        shared = self.d[pos + 4]
        out = []
        for i in range(shared):
            (xid,) = struct.unpack_from("<I", self.d, pos + 12 + 4 * i)
            out.append(self._entry(self.xattr_blk * BLOCK + 4 * xid)[0])
        at, end = pos + 12 + 4 * shared, pos + ino.xsize
        while at < end:
            item, length = self._entry(at)
            out.append(item)
            at += length
        if at != end:
            raise CorruptImage(f"nid {ino.head.nid}: inline xattrs overrun their body")
        names = [n for n, _ in out]
        if len(set(names)) != len(names):
            raise CorruptImage(f"nid {ino.head.nid}: an xattr name repeats")
        return tuple(sorted(out))

    def _entry(self, at: int) -> tuple[tuple[bytes, bytes], int]:
        name_len, index, value_len = struct.unpack_from("<BBH", self.d, at)
        if index not in _PREFIX:
            raise CorruptImage(f"xattr at {at}: name index {index}")
        name = bytes(self.d[at + 4 : at + 4 + name_len])
        value = bytes(self.d[at + 4 + name_len : at + 4 + name_len + value_len])
        return (_PREFIX[index] + name, value), -(-(4 + name_len + value_len) // 4) * 4

    # -- data --------------------------------------------------------------------

    def extents(self, ino: _Raw) -> Iterator[tuple[int | None, int, bool]]:
        """(offset in the image or None for a hole, length, inline?) covering the data."""
        size, layout, nid = ino.head.size, ino.head.layout, ino.head.nid
        base = ino.pos + ino.isize + ino.xsize
        if layout == 4:
            yield from self._chunks(nid, size, base, ino.i_u)
            return
        full = size if layout == 0 else size - size % BLOCK
        if layout == 2 and size % BLOCK == 0:
            raise CorruptImage(f"nid {nid}: inline layout without a tail")
        if full:
            if ino.i_u + -(-full // BLOCK) > self.blocks:
                raise CorruptImage(f"nid {nid}: data past the image's end")
            yield ino.i_u * BLOCK, full, False
        if layout == 2:
            tail = size - full
            if base % BLOCK + tail > BLOCK:
                raise CorruptImage(f"nid {nid}: inline data crosses a block")
            yield base, tail, True

    def _chunks(
        self, nid: int, size: int, base: int, fmt: int
    ) -> Iterator[tuple[int | None, int, bool]]:
        if fmt & ~0x1F or not self.incompat & 0x4:
            raise CorruptImage(f"nid {nid}: chunk format {fmt:#x}")
        chunk = BLOCK << fmt
        for i in range(-(-size // chunk)):
            (addr,) = struct.unpack_from("<I", self.d, base + 4 * i)
            length = min(chunk, size - i * chunk)
            if addr == 0xFFFFFFFF:
                yield None, length, False
            elif addr + -(-length // BLOCK) > self.blocks:
                raise CorruptImage(f"nid {nid}: chunk {i} past the image's end")
            else:
                yield addr * BLOCK, length, False

    def content(self, ino: _Raw, hash_limit: int) -> tuple[str | None, int]:
        """The sha256 of a file's content (None past ``hash_limit``) and its data blocks."""
        digest, blocks = hashlib.sha256(), 0
        hashing = ino.head.size <= hash_limit
        for at, length, inline in self.extents(ino):
            blocks += 0 if inline or at is None else -(-length // BLOCK)
            if not hashing:
                continue
            if at is None:
                for n in range(0, length, len(_ZERO)):
                    digest.update(_ZERO[: min(len(_ZERO), length - n)])
                continue
            view = memoryview(self.d)[at : at + length]
            digest.update(view)
            view.release()
        return (digest.hexdigest() if hashing else None), blocks

    def read_range(self, ino: _Raw, offset: int, length: int) -> bytes:
        """``length`` bytes of a file from ``offset`` (holes as zeros)."""
        out, pos = bytearray(), 0
        for at, n, _ in self.extents(ino):
            lo, hi = max(offset, pos), min(offset + length, pos + n)
            if lo < hi:
                out += bytes(hi - lo) if at is None else self.d[at + lo - pos : at + hi - pos]
            pos += n
        return bytes(out)

    def raw(self, ino: _Raw) -> bytes:
        return b"".join(bytes(self.d[a : a + n]) for a, n, _ in self.extents(ino) if a is not None)

    # -- directories ---------------------------------------------------------------

    def dirents(self, ino: _Raw) -> list[tuple[bytes, int, int]]:
        """(name, nid, file type) of a directory, checked as namei.c would search it."""
        data, size, nid = self.raw(ino), ino.head.size, ino.head.nid
        if ino.head.layout == 2:
            end = ino.pos + ino.isize + ino.xsize + size % BLOCK
            if end % BLOCK == 0 or self.d[end] != 0:
                raise CorruptImage(f"nid {nid}: inline dirents not followed by a NUL")
        out: list[tuple[bytes, int, int]] = []
        for start in range(0, size, BLOCK):
            block = data[start : min(size, start + BLOCK)]
            (first,) = struct.unpack_from("<H", block, 8)
            if first < 12 or first >= BLOCK or first % 12:
                raise CorruptImage(f"nid {nid}: block {start // BLOCK}: nameoff {first}")
            count = first // 12
            heads = [struct.unpack_from("<QHBB", block, 12 * i) for i in range(count)]
            for i, (child, off, ftype, _) in enumerate(heads):
                stop = heads[i + 1][1] if i + 1 < count else len(block)
                name = block[off:stop]
                if i + 1 == count:
                    name = name.split(b"\0", 1)[0]
                if not 0 < len(name) <= 255 or b"\0" in name or b"/" in name:
                    raise CorruptImage(f"nid {nid}: bad name {name!r}")
                out.append((name, child, ftype))
        names = [n for n, _, _ in out]
        if names != sorted(names) or len(set(names)) != len(names):
            raise CorruptImage(f"nid {nid}: names not strictly sorted bytewise")
        return out


@dataclass(frozen=True)
class _Raw:
    head: Inode
    pos: int
    isize: int
    xsize: int
    i_u: int


def read_image(path: Path | str, hash_limit: int = 1 << 30) -> Image:
    """Parse and check a whole image; every path of the tree, ``b"/"`` for the root.

    Files larger than ``hash_limit`` get no ``sha256`` (read them with
    :func:`read_range`): hashing gigabytes of holes is slow.
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        r = _Reader(m)
        image = Image(r.root_nid, r.build_time, r.build_nsec, r.blocks, r.uuid, r.inos, r.incompat)
        _walk(r, image.tree, hash_limit)
        return image


def read_range(path: Path | str, node: Inode, offset: int, length: int) -> bytes:
    """Bytes of the file ``node`` (from :func:`read_image`) of the image at ``path``."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        r = _Reader(m)
        return r.read_range(r.inode(node.nid), offset, length)


def _walk(r: _Reader, tree: dict[bytes, Inode], hash_limit: int) -> None:
    names: Counter[int] = Counter()
    seen: dict[int, Inode] = {}
    stack = [(b"/", r.root_nid, r.root_nid)]
    while stack:
        path, nid, parent = stack.pop()
        names[nid] += 1
        if nid in seen:
            tree[path] = seen[nid]
            continue
        node = _load(r, r.inode(nid), path, parent, stack, hash_limit)
        seen[nid] = tree[path] = node
    for nid, node in seen.items():
        want = names[nid] if node.kind != "dir" else node.nlink
        if node.nlink != want:
            raise CorruptImage(f"nid {nid}: nlink {node.nlink}, {want} names")
    if len(seen) != r.inos:
        raise CorruptImage(f"superblock counts {r.inos} inodes, the tree has {len(seen)}")


def _load(
    r: _Reader,
    ino: _Raw,
    path: bytes,
    parent: int,
    stack: list[tuple[bytes, int, int]],
    hash_limit: int,
) -> Inode:
    head, extra = ino.head, {}
    extra["xattrs"], extra["xattr_size"] = r.xattrs(ino), ino.xsize
    if head.kind == "file":
        extra["sha256"], extra["data_blocks"] = r.content(ino, hash_limit)
    elif head.kind == "symlink":
        extra["target"] = r.raw(ino)
    elif head.kind in ("char", "block"):
        dev = ino.i_u
        extra["rdev"] = ((dev >> 8) & 0xFFF, (dev & 0xFF) | ((dev >> 12) & 0xFFF00))
    elif head.kind == "dir":
        subdirs = 0
        for name, child, ftype in r.dirents(ino):
            if name in (b".", b".."):
                if child != (head.nid if name == b"." else parent) or ftype != 2:
                    raise CorruptImage(f"{path!r}: {name!r} names nid {child}")
                continue
            kind = r.inode(child).head.kind
            if _FT[kind] != ftype:
                raise CorruptImage(f"{path!r}/{name!r}: file type {ftype}, inode is a {kind}")
            subdirs += kind == "dir"
            stack.append(((path.rstrip(b"/") + b"/" + name), child, head.nid))
        if head.nlink != 2 + subdirs:
            raise CorruptImage(f"{path!r}: nlink {head.nlink}, {subdirs} subdirectories")
    return Inode(**{**head.__dict__, **extra})


def hard_link_groups(tree: dict[bytes, Inode]) -> set[frozenset[bytes]]:
    """Paths that share a non-directory inode, in groups of two or more."""
    by_nid: dict[int, set[bytes]] = {}
    for path, node in tree.items():
        if node.kind != "dir":
            by_nid.setdefault(node.nid, set()).add(path)
    return {frozenset(p) for p in by_nid.values() if len(p) > 1}


def listing(tree: dict[bytes, Inode]) -> dict[bytes, tuple[object, ...]]:
    """A comparable view: what a user sees of each path, no layout details or nids."""
    return {
        path: (
            n.kind, n.mode, n.uid, n.gid, n.size if n.kind == "file" else 0, n.mtime,
            n.mtime_nsec, n.sha256, n.target, n.rdev, n.xattrs,
            n.nlink if n.kind != "dir" else None,
        )
        for path, n in tree.items()
    }  # fmt: skip
