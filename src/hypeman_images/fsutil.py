"""Atomic file publication, and removal: the ways files appear in and leave the data dir.

Every file that others can see appears by rename of a fsynced temp file in the
same directory, and links are swapped by rename too (docs/design.md, "On-disk
layout": the rules that keep the store consistent through crashes). Every tree
leaves through :func:`remove_tree`, which no depth can defeat
(docs/security.md, "Deep trees and leftovers").
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import itertools
import logging
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, TypeGuard, cast

from hypeman_images.errors import StorageError

log = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"
_DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def temp_prefix(name: str) -> str:
    """The start of a temp name for ``name``: ``.tmp-<name>.<pid>.`` (see :func:`writer_alive`).

    For ``tempfile`` functions, which add the random part themselves.
    """
    return f"{TEMP_PREFIX}{name}.{os.getpid()}."


def temp_name(final: Path) -> Path:
    """A unique temp path beside ``final``, recognisable by :data:`TEMP_PREFIX`."""
    return final.with_name(temp_prefix(final.name) + secrets.token_hex(4))


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h


@functools.cache
def _sync_file_range() -> Callable[..., int] | None:
    try:
        func = ctypes.CDLL(None, use_errno=True).sync_file_range  # a CDLL call drops the GIL
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return cast("Callable[..., int]", func)


def start_writeback(fd: int, offset: int = 0, length: int = 0) -> None:
    """Start writing the file's dirty pages to the device, without waiting for them.

    Those of ``length`` bytes from ``offset`` (0: to the end of the file) only.

    With much RAM the kernel writes nothing back for 30 s
    (``dirty_expire_centisecs``, Documentation/admin-guide/sysctl/vm.rst), so a
    big file's fsync writes it all at once, after the last byte: calling this as
    a file grows overlaps that I/O with the writing instead. Only an
    optimisation: without ``sync_file_range`` (not Linux) nothing happens.
    """
    func = _sync_file_range()
    if func is not None:
        func(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


# Starts the device writes of (offset, length) of a file: 0, 0 for all of it.
WritebackRequest = Callable[[int, int], object]


@contextlib.contextmanager
def writeback_thread(fd: int, name: str) -> Iterator[WritebackRequest]:
    """:func:`start_writeback` of ``fd`` on a thread of its own: yields ``request(offset, length)``.

    ``sync_file_range`` blocks while the device's queue is full (tens of
    milliseconds on the benchmark VM, docs/performance.md), so a thread that
    reads, inflates or writes must not make the call itself: it would stop
    its own work meanwhile. Requests run in order; leaving the block waits
    for them, so ``fd`` must stay open until then.
    """
    with ThreadPoolExecutor(1, thread_name_prefix=name) as pool:
        yield lambda offset, length: pool.submit(start_writeback, fd, offset, length)


def storage_error(exc: OSError, what: str) -> StorageError:
    """Translate an OSError from the data dir into a message that says what to do."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(
            f"{what}: the filesystem is full ({exc.strerror}); free space and retry"
        )
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        # Not the data dir's fault: the process (or the host) is out of descriptors.
        return StorageError(
            f"{what}: too many open files ({exc.strerror}); raise the open-file limit "
            "(ulimit -n, or LimitNOFILE= in a systemd unit) and retry"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(
            f"{what}: permission denied ({exc.strerror})",
            hint="check the data dir's owner or pass --data-dir",
            api_hint="the server's data dir is not writable",
        )
    return StorageError(f"{what}: {exc.strerror or exc}")


def is_storage_failure(exc: BaseException) -> TypeGuard[OSError]:
    """An OSError from our own file operations, not a network error that is also an OSError."""
    return isinstance(exc, OSError) and not isinstance(exc, ConnectionError | TimeoutError)


# Files the data dir holds are never readable by others (store/access.py says who may).
FILE_MODE = 0o640


@contextlib.contextmanager
def atomic_writer(
    final: Path, mode: int = FILE_MODE, *, durable: bool = True
) -> Iterator[BinaryIO]:
    """Write ``final`` through a temp file: fsync, then rename into place.

    On any exception the temp file is removed and ``final`` is untouched.
    Not ``durable``: no fsync, for a cache whose torn files read as misses.
    """
    tmp = temp_name(final)
    try:
        with open(tmp, "xb") as handle:
            yield handle
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, final)
        if durable:
            fsync_dir(final.parent)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if is_storage_failure(exc):
            raise storage_error(exc, f"cannot write {final}") from exc
        raise


def write_atomic(final: Path, data: bytes, mode: int = FILE_MODE, *, durable: bool = True) -> None:
    """Publish ``data`` at ``final`` atomically."""
    with atomic_writer(final, mode, durable=durable) as handle:
        handle.write(data)


def replace_symlink(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` by renaming a new link over it: never a moment without one."""
    tmp = temp_name(link)
    try:
        os.symlink(target, tmp)
        os.replace(tmp, link)
        fsync_dir(link.parent)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise storage_error(exc, f"cannot update tag link {link}") from exc


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, proc(5) field 22), if known."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        return fields[19].decode()
    except (OSError, IndexError):
        return None


def process_id() -> str:
    """This process, as ``<pid>:<start time>``: unlike a pid alone, never reused."""
    return _process_id(os.getpid())  # keyed by pid: a forked child is another process


@functools.cache
def _process_id(pid: int) -> str:
    return f"{pid}:{_start_time(pid) or ''}"


def process_alive(ident: str) -> bool:
    """Is the process :func:`process_id` named still running (the same one, not a reuse)?"""
    pid_text, _, started = ident.partition(":")
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    if pid == os.getpid():
        return ident == process_id()
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _start_time(pid)
    return not started or now is None or now == started


def writer_alive(name: str) -> bool:
    """Is the process that made this temp name (``….<pid>.<random>``) still running?

    Lets cleanup remove only what a crashed or finished writer left behind.
    """
    try:
        pid = int(name.split(".")[-2])
    except (ValueError, IndexError):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def allocated_bytes(info: os.stat_result) -> int:
    """The disk space that unlinking this file gives back: its allocated blocks, not its
    (sparse) size, and nothing while another hard link keeps them."""
    if stat.S_ISDIR(info.st_mode) or info.st_nlink <= 1:
        return info.st_blocks * 512
    return 0


def remove_tree(path: Path) -> int:
    """Delete ``path`` and all under it, never following a symlink; return bytes freed.

    Iterative and bounded however deep the tree: Python 3.11's ``shutil.rmtree``
    recurses once per level (RecursionError near 1,000 levels), and a walk by
    path fails past PATH_MAX. Here each directory's subdirectories are renamed
    up into ``path`` itself before it is removed, so at most two descriptors
    are open, no path grows, and each entry moves at most once
    (tests/test_fsutil.py). Raises ``OSError`` when something cannot be removed.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return 0
    if not stat.S_ISDIR(info.st_mode):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            return allocated_bytes(info)
        return 0
    freed = 0
    top = os.open(path, _DIR_OPEN)
    try:
        _make_emptiable(top)
        names = (f".rm-{secrets.token_hex(6)}-{n}" for n in itertools.count())
        while entries := _entries(top):
            for name, is_dir in entries:
                if is_dir:
                    freed += _hoist_children(top, name, names)
                    os.rmdir(name, dir_fd=top)
                else:
                    freed += _unlink_at(top, name)
    finally:
        os.close(top)
    os.rmdir(path)
    return freed


def _entries(fd: int) -> list[tuple[str, bool]]:
    with os.scandir(fd) as scan:
        return [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in scan]


def _hoist_children(top: int, name: str, names: Iterator[str]) -> int:
    """Empty directory ``name`` of ``top``: unlink its files, move its directories to ``top``."""
    freed = 0
    fd = os.open(name, _DIR_OPEN, dir_fd=top)
    try:
        _make_emptiable(fd)
        for child, is_dir in _entries(fd):
            if is_dir:
                os.rename(child, next(names), src_dir_fd=fd, dst_dir_fd=top)
            else:
                freed += _unlink_at(fd, child)
    finally:
        os.close(fd)
    return freed


def _make_emptiable(fd: int) -> None:
    """A read-only directory of the tree (a layer may ship one) gets its owner's rwx back."""
    mode = os.fstat(fd).st_mode
    if mode & 0o700 != 0o700:
        with contextlib.suppress(OSError):
            os.fchmod(fd, stat.S_IMODE(mode) | 0o700)


def _unlink_at(fd: int, name: str) -> int:
    try:
        info = os.lstat(name, dir_fd=fd)
        os.unlink(name, dir_fd=fd)
    except FileNotFoundError:
        return 0
    return allocated_bytes(info)


def own_directory(path: Path) -> None:
    """Make sure ``path`` is a real directory of the data dir, creating it if need be.

    The store's own directories are never symlinks: through one, a disk could
    be written, or gc delete, outside the data dir (docs/security.md, "Symlinks in
    the data dir"). Raises :class:`StorageError` saying what to do.
    """
    with contextlib.suppress(OSError):  # what is there is judged below
        os.mkdir(path)
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise storage_error(exc, f"cannot create {path}") from exc
    if stat.S_ISLNK(info.st_mode):
        raise StorageError(
            f"{path} is a symlink; the data dir's own directories must be real directories "
            "(a link could put disks or let gc delete files outside the data dir): replace it "
            "with a directory, or point --data-dir at the real location"
        )
    if not stat.S_ISDIR(info.st_mode):
        raise StorageError(f"{path} is not a directory; move it away so the store can use it")


def quarantine(path: Path, into: Path, label: str) -> Path | None:
    """Move ``path`` out of the way into the directory ``into`` (made if need be).

    For what recovery cannot understand or remove: it is kept for a person to
    look at, under ``<UTC time>.<label>``, and the store goes on without it
    (docs/security.md, "Deep trees and leftovers"). None if even the move failed.
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = into / f"{stamp}.{secrets.token_hex(3)}.{label.replace('/', '_')}"
    try:
        own_directory(into)
        os.rename(path, target)
    except FileNotFoundError:
        return None
    except (OSError, StorageError) as exc:
        log.warning("cannot move %s into the quarantine %s: %s", path, into, exc)
        return None
    log.warning("moved %s to %s", path, target)
    return target


def discard(path: Path, quarantine_dir: Path | None, label: str) -> int:
    """Remove a leftover; one that cannot be removed is logged and quarantined. Bytes freed."""
    try:
        return remove_tree(path)
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)
        if quarantine_dir is not None:
            quarantine(path, quarantine_dir, label)
        return 0
