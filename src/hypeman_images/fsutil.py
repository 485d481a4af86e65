"""Atomic file publication: the one way files become visible in the data dir.

Every file that others can see appears by rename of a fsynced temp file in the
same directory, and links are swapped by rename too (docs/design.md, "On-disk
layout": the rules that keep the store consistent through crashes).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, TypeGuard, cast

from hypeman_images.errors import StorageError

TEMP_PREFIX = ".tmp-"


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


def start_writeback(fd: int) -> None:
    """Start writing the file's dirty pages to the device, without waiting for them.

    With much RAM the kernel writes nothing back for 30 s
    (``dirty_expire_centisecs``, Documentation/admin-guide/sysctl/vm.rst), so a
    big file's fsync writes it all at once, after the last byte: calling this as
    a file grows overlaps that I/O with the writing instead. Only an
    optimisation: without ``sync_file_range`` (not Linux) nothing happens.
    """
    func = _sync_file_range()
    if func is not None:
        func(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def storage_error(exc: OSError, what: str) -> StorageError:
    """Translate an OSError from the data dir into a message that says what to do."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(
            f"{what}: the filesystem is full ({exc.strerror}); free space and retry"
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


@contextlib.contextmanager
def atomic_writer(final: Path, mode: int = 0o644, *, durable: bool = True) -> Iterator[BinaryIO]:
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


def write_atomic(final: Path, data: bytes, mode: int = 0o644, *, durable: bool = True) -> None:
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
