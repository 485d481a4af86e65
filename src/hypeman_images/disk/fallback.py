"""The disk without ``mke2fs -d -``: stage plain files, then replay metadata with debugfs.

For e2fsprogs < 1.47.1 (Debian 12's stock 1.47.0). The tar stream is read
with :mod:`tarfile` in stream mode as a header parser only — never
``extract`` — and staged as the unprivileged user: directories, regular files
(holes kept as holes), symlinks, fifos and hard links (as host hard links, so
``mke2fs -d DIR`` keeps each group as one inode). Nothing that needs root or
could reach the host is applied there: owners, modes, times, device nodes
and xattrs become debugfs commands (``sif``, ``mknod``, ``ln``, ``ea_set``)
replayed on the image in stream order, so the last header naming an inode
wins, as it does in mke2fs's tar reader.

Staging goes through directory file descriptors opened with ``O_NOFOLLOW``:
a symlink in the tree is never followed, and ``..`` or empty components are
refused. Only ``SCHILY.xattr.*`` PAX records carry xattrs (what flatten and
GNU tar write); sub-second times are dropped (debugfs takes whole seconds).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, BinaryIO

from hypeman_images.disk.debugfs import Batch
from hypeman_images.errors import LayerError, LimitExceeded, StorageError
from hypeman_images.fsutil import remove_tree, temp_prefix

log = logging.getLogger(__name__)

# The deepest path the staged tree may hold, in components (``a/b/c`` has three). ``mke2fs -d DIR``
# (1.47.0) aborts on a tree some 1,100 levels deep (realloc(): invalid next
# size), and nothing that boots needs a tenth of this (docs/security.md, "Deep trees
# and leftovers"; tests/disk/test_fallback.py).
MAX_STAGED_DEPTH = 512
_CHUNK = 1 << 20
_ZERO = bytes(_CHUNK)
_XATTR = "SCHILY.xattr."
_ENC = ("utf-8", "surrogateescape")
_DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class _Meta:
    mode: int
    uid: int
    gid: int
    mtime: int
    atime: int
    ctime: int
    xattrs: dict[str, bytes] = field(default_factory=dict)


@dataclass
class _Replay:
    """What the staged tree lacks, in the order debugfs must apply it."""

    structure: list[tuple[str, bytes, tuple[str, ...]]] = field(default_factory=list)
    meta: dict[bytes, _Meta] = field(default_factory=dict)
    # Inodes whose hard links debugfs makes (``ln``), not the staging: device nodes
    # (they exist only in the image) and symlinks. path -> link count.
    linked: dict[bytes, int] = field(default_factory=dict)


@contextlib.contextmanager
def staging_dir(near: Path) -> Iterator[Path]:
    """A private directory beside the disk (same filesystem), removed afterwards.

    Removed by :func:`~hypeman_images.fsutil.remove_tree`, which no depth defeats;
    what it cannot remove is left, under its temp name, to recovery and gc.
    """
    try:
        path = Path(tempfile.mkdtemp(prefix=temp_prefix("staging"), dir=near))
    except OSError as exc:
        raise StorageError(f"cannot create a staging dir in {near}: {exc.strerror}") from exc
    try:
        yield path
    finally:
        try:
            remove_tree(path)
        except OSError as exc:
            log.warning("cannot remove the staging dir %s: %s", path, exc)


def _normalise(name: str) -> bytes:
    """``./etc/passwd`` → ``etc/passwd``; the root is ``b""``. Refuses ``..``, NUL, and
    paths deeper than :data:`MAX_STAGED_DEPTH`."""
    raw = name.encode(*_ENC).strip(b"/")
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    if any(p == b".." or b"\0" in p for p in parts):
        raise LayerError(f"tar member {name!r} escapes the root")
    if len(parts) > MAX_STAGED_DEPTH:
        raise LimitExceeded(
            f"the image has a path of {len(parts)} components; without `mke2fs -d -` "
            f"(e2fsprogs < 1.47.1) a disk can hold paths of at most {MAX_STAGED_DEPTH}: "
            "install e2fsprogs 1.47.1 or later to build this image"
        )
    return b"/".join(parts)


def _parent(root_fd: int, path: bytes) -> tuple[int, bytes]:
    """An fd of ``path``'s parent reached without following symlinks, and the leaf name."""
    *dirs, leaf = path.split(b"/")
    fd = os.dup(root_fd)
    try:
        for component in dirs:
            child = os.open(component, _DIR_OPEN, dir_fd=fd)
            os.close(fd)
            fd = child
    except OSError:
        os.close(fd)
        raise
    return fd, leaf


def _meta(member: tarfile.TarInfo, type_bits: int) -> _Meta:
    pax = member.pax_headers
    xattrs = {
        key[len(_XATTR) :]: value.encode(*_ENC)
        for key, value in pax.items()
        if key.startswith(_XATTR)
    }
    return _Meta(
        mode=type_bits | (member.mode & 0o7777),
        uid=member.uid,
        gid=member.gid,
        mtime=int(member.mtime),
        atime=int(float(pax.get("atime", 0))),
        ctime=int(float(pax.get("ctime", 0))),
        xattrs=xattrs,
    )


def _write_body(fd: int, source: IO[bytes], size: int) -> None:
    """Copy a member's body, seeking over all-zero chunks so holes stay holes."""
    offset = 0
    while chunk := source.read(_CHUNK):
        if chunk == _ZERO[: len(chunk)]:
            os.lseek(fd, len(chunk), os.SEEK_CUR)
        else:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
        offset += len(chunk)
    if offset != size:
        raise LayerError(f"tar member body ended after {offset} of {size} bytes")
    os.ftruncate(fd, size)


def _type_bits(member: tarfile.TarInfo) -> int:
    if member.isreg():
        return stat.S_IFREG
    if member.isdir():
        return stat.S_IFDIR
    if member.issym():
        return stat.S_IFLNK
    if member.ischr():
        return stat.S_IFCHR
    if member.isblk():
        return stat.S_IFBLK
    if member.isfifo():
        return stat.S_IFIFO
    raise LayerError(f"tar member {member.name!r} has unsupported type {member.type!r}")


def _remove_existing(pfd: int, leaf: bytes, path: bytes, replay: _Replay) -> None:
    """A repeated non-directory entry replaces what was there (mke2fs does the same)."""
    if replay.linked.pop(path, None) is not None:
        replay.structure = [s for s in replay.structure if s[1] != path]
    with contextlib.suppress(FileNotFoundError):
        os.unlink(leaf, dir_fd=pfd)


def _stage_member(
    tar: tarfile.TarFile, member: tarfile.TarInfo, root_fd: int, replay: _Replay
) -> None:
    path = _normalise(member.name)
    if member.islnk():
        target = _normalise(member.linkname)
        inode_meta = replay.meta.get(target)
        bits = stat.S_IFMT(inode_meta.mode) if inode_meta else stat.S_IFREG
        meta = _meta(member, bits)
    else:
        meta = _meta(member, _type_bits(member))
    replay.meta.pop(path, None)
    replay.meta[path] = meta
    if path == b"":
        return  # the root exists already; its metadata is replayed
    pfd, leaf = _parent(root_fd, path)
    try:
        if member.isdir():
            with contextlib.suppress(FileExistsError):
                os.mkdir(leaf, 0o700, dir_fd=pfd)
            return
        _remove_existing(pfd, leaf, path, replay)
        if member.isreg():
            fd = os.open(
                leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=pfd
            )
            try:
                source = tar.extractfile(member)
                assert source is not None
                _write_body(fd, source, member.size)
            finally:
                os.close(fd)
        elif member.issym():
            os.symlink(member.linkname.encode(*_ENC), leaf, dir_fd=pfd)
        elif member.isfifo():
            os.mkfifo(leaf, 0o600, dir_fd=pfd)
        elif member.ischr() or member.isblk():
            kind = "c" if member.ischr() else "b"
            replay.structure.append(
                ("mknod", path, (kind, str(member.devmajor), str(member.devminor)))
            )
            replay.linked[path] = 1
        elif member.islnk():
            _stage_hardlink(root_fd, pfd, leaf, path, _normalise(member.linkname), replay)
    finally:
        os.close(pfd)


def _stage_hardlink(
    root_fd: int, pfd: int, leaf: bytes, path: bytes, target: bytes, replay: _Replay
) -> None:
    target_meta = replay.meta.get(target)
    if target in replay.linked or (target_meta is not None and stat.S_ISLNK(target_meta.mode)):
        # Device nodes exist only in the image; a hard link to a symlink would be
        # staged fine, but mke2fs -d DIR copies it as a second symlink (its hard-link
        # table skips S_ISLNK: misc/create_inode.c __populate_fs).
        replay.structure.append(("ln", target, (path.decode(*_ENC),)))
        replay.linked[target] = replay.linked.get(target, 1) + 1
        return
    tfd, tleaf = _parent(root_fd, target)
    try:
        os.link(tleaf, leaf, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
    except FileNotFoundError as exc:
        raise LayerError(f"hard link {path!r} names {target!r}, not yet in the stream") from exc
    finally:
        os.close(tfd)


def _consume(reader: BinaryIO, root: Path, default_time: int) -> _Replay:
    replay = _Replay()
    root_fd = os.open(root, _DIR_OPEN)
    try:
        with tarfile.open(fileobj=reader, mode="r|", encoding=_ENC[0], errors=_ENC[1]) as tar:
            for member in tar:
                _stage_member(tar, member, root_fd, replay)
    except tarfile.TarError as exc:
        raise LayerError(f"the merged tar stream is malformed: {exc}") from exc
    finally:
        os.close(root_fd)
    if b"" not in replay.meta:
        # mke2fs's own root for a stream without "./": 0755 root:root at the fixed time.
        t = default_time
        replay.meta = {b"": _Meta(stat.S_IFDIR | 0o755, 0, 0, t, t, t), **replay.meta}
    return replay


def _queue(replay: _Replay, batch: Batch) -> set[tuple[bytes, str]]:
    for command, path, args in replay.structure:
        if command == "ln":  # debugfs ln: source first, new name second
            batch.command("ln", path, args[0].encode(*_ENC))
        else:
            batch.mknod(path, args[0], int(args[1]), int(args[2]))
    for path, count in replay.linked.items():
        if count > 1:  # debugfs ln does not touch the link count
            batch.set_field(b"/" + path, "links_count", str(count))
    done: set[tuple[bytes, str]] = set()
    for path, meta in replay.meta.items():
        target = b"/" + path
        batch.set_field(target, "mode", f"0{meta.mode:o}")
        batch.set_field(target, "uid", str(meta.uid))
        batch.set_field(target, "gid", str(meta.gid))
        for name, when in (("mtime", meta.mtime), ("atime", meta.atime), ("ctime", meta.ctime)):
            batch.set_field(target, name, f"@{when}")
        for name, value in meta.xattrs.items():
            batch.set_xattr(target, name, value)
            done.add((path, name))
    return done


def stage(
    write_stream: Callable[[BinaryIO], None], root: Path, batch: Batch, default_time: int = 1
) -> set[tuple[bytes, str]]:
    """Stage the stream under ``root`` and queue the rest in ``batch``.

    ``write_stream`` runs in a helper thread writing into a pipe that this
    thread parses, so the stream is never spooled whole. Returns the
    ``(path, xattr name)`` pairs queued, so callers skip duplicate fixups.
    """
    read_fd, write_fd = os.pipe()
    reader = os.fdopen(read_fd, "rb", buffering=_CHUNK)
    writer = os.fdopen(write_fd, "wb", buffering=_CHUNK)
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            write_stream(writer)
        except BaseException as exc:  # re-raised in the calling thread
            failure.append(exc)
        finally:
            with contextlib.suppress(OSError):
                writer.close()

    thread = threading.Thread(target=produce, name="tar-stream", daemon=True)
    thread.start()
    try:
        replay = _consume(reader, root, default_time)
        while reader.read(_CHUNK):  # trailing zero blocks after the end marker
            pass
    finally:
        reader.close()
        thread.join()
    if failure:
        raise failure[0]
    return _queue(replay, batch)
