"""Edit a finished ext4 image with one ``debugfs -w -f <batch>`` run.

debugfs reads its batch file line by line (``fgets``, then the first ``\n``
and ``\r`` cut the line: debugfs.c ``source_file``) and splits each line with
the ss library's parser (lib/ss/parse.c): whitespace separates arguments, a
double quote starts and ends a quoted argument, and inside quotes ``""``
stands for one literal ``"``; no other byte is special. There is no escape
for a newline, so a command naming a path with a newline or carriage return
cannot go in the batch file; ``debugfs -R REQUEST`` hands its argument to the
same parser without cutting it, so such a command runs alone that way, in
its place in the batch's order (verified with debugfs 1.47.0 and 1.47.2).
Values go through files (``ea_set -f``) so binary xattr values
(``security.capability``) arrive byte for byte.

debugfs exits 0 even when a command fails; failures show only on stderr, so
:func:`run_batch` treats any stderr line other than the version banner as an
error.
"""

from __future__ import annotations

import errno
import os
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from hypeman_images.disk.e2fsprogs import E2fsprogs, run_tool, tail
from hypeman_images.errors import StorageError, ToolError
from hypeman_images.fsutil import temp_prefix

_LINE_BREAKS = (b"\n", b"\r")


def quote(path: bytes) -> bytes:
    """One debugfs argument naming ``path`` (absolute inside the image).

    A newline or carriage return is kept: :func:`run_batch` runs such a
    command with ``-R``. A NUL cannot be passed to debugfs at all (no
    path holds one: flatten refuses it).
    """
    if b"\0" in path:
        raise ToolError(f"path {path!r} contains a NUL byte, which debugfs cannot be given")
    if not path.startswith(b"/"):
        # A leading "/" also keeps debugfs from reading "<12>" as inode number 12.
        path = b"/" + path
    return b'"' + path.replace(b'"', b'""') + b'"'


def quote_name(name: bytes) -> bytes:
    """One debugfs argument naming a single directory entry (no ``/``)."""
    if not name or b"/" in name:
        raise ToolError(f"{name!r} is not a single file name")
    return quote(b"/" + name)[:1] + quote(b"/" + name)[2:]


@dataclass
class Batch:
    """debugfs commands collected in order, with the value files they refer to."""

    workdir: Path
    lines: list[bytes] = field(default_factory=list)
    _values: int = 0

    def __post_init__(self) -> None:
        # Value files are named to debugfs by host path, which must be absolute:
        # quote() would turn "data/x" into "/data/x" (tests/cli/test_cli.py).
        self.workdir = Path(os.path.abspath(self.workdir))

    def command(self, *words: bytes | str) -> None:
        """Append one command; ``bytes`` words are paths and get quoted."""
        parts = [quote(w) if isinstance(w, bytes) else w.encode() for w in words]
        self.lines.append(b" ".join(parts))

    def set_xattr(self, path: bytes, name: str, value: bytes) -> None:
        """``ea_set -f <file> PATH NAME`` with the value written to a private file."""
        if not name or any(c in name for c in ' \t\n"'):
            raise ToolError(f"xattr name {name!r} cannot be passed to debugfs")
        self._values += 1
        value_file = self.workdir / f"xattr-{self._values}"
        _write(value_file, value)
        self.lines.append(
            b"ea_set -f " + quote(bytes(value_file)) + b" " + quote(path) + b" " + name.encode()
        )

    def mknod(self, path: bytes, kind: str, major: int = 0, minor: int = 0) -> None:
        """Create a device node or fifo at ``path``.

        debugfs 1.47.0's mknod takes its argument as one name in the current
        directory (a "/dev/null" argument makes an entry of that name in the
        root), so change into the parent first.
        """
        if any(c in path for c in _LINE_BREAKS):
            # The cd and the mknod would each run alone (see run_batch), so the
            # mknod would not happen in the directory the cd chose.
            raise ToolError(
                f"device node {path!r}: a newline in its path cannot be given to debugfs's "
                "mknod, which works in the current directory; the older-e2fsprogs fallback "
                "cannot make it (e2fsprogs >= 1.47.1 can: mke2fs -d - makes device nodes)"
            )
        parent, _, leaf = path.strip(b"/").rpartition(b"/")
        self.command("cd", b"/" + parent)
        args = [kind] if kind == "p" else [kind, str(major), str(minor)]
        self.lines.append(b" ".join([b"mknod", quote_name(leaf), *(a.encode() for a in args)]))
        self.command("cd", b"/")

    def set_field(self, path: bytes, name: str, value: str) -> None:
        """``set_inode_field PATH NAME VALUE``."""
        self.command("sif", path, name, value)


def _write(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise _storage_error(exc, f"cannot write {path}") from exc


def _storage_error(exc: OSError, doing: str) -> StorageError:
    if exc.errno == errno.ENOSPC:
        return StorageError(f"the data dir's filesystem is full: {doing}: {exc.strerror}")
    return StorageError(f"{doing}: {exc.strerror}")


def run_batch(tools: E2fsprogs, image: Path, batch: Batch, *, fake_time: int) -> None:
    """Apply ``batch`` to ``image``; :class:`ToolError` on any failure.

    One ``debugfs -w -f`` run for all of it, unless a command holds a line
    break: that one runs alone with ``-R`` and the commands around it in
    ``-f`` runs before and after, so the order stays the batch's.
    """
    run: list[bytes] = []
    for line in batch.lines:
        if any(c in line for c in _LINE_BREAKS):
            _run_script(tools, image, batch.workdir, run, fake_time)
            run = []
            argv = [str(tools.debugfs), "-w", "-R", os.fsdecode(line), str(image)]
            _check(run_tool(tools, argv, what="debugfs", fake_time=fake_time), image)
        else:
            run.append(line)
    _run_script(tools, image, batch.workdir, run, fake_time)


def _run_script(
    tools: E2fsprogs, image: Path, workdir: Path, lines: list[bytes], fake_time: int
) -> None:
    if not lines:
        return
    script = workdir / "batch.debugfs"
    _write(script, b"".join(line + b"\n" for line in lines))
    argv = [str(tools.debugfs), "-w", "-f", str(script), str(image)]
    _check(run_tool(tools, argv, what="debugfs", fake_time=fake_time), image)


def _check(proc: subprocess.CompletedProcess[bytes], image: Path) -> None:
    errors = [line for line in proc.stderr.splitlines() if not line.startswith(b"debugfs ")]
    if proc.returncode != 0 or errors:
        said = tail(b"\n".join(errors) or proc.stderr)
        if b"No space left on device" in proc.stderr:
            raise StorageError(f"the data dir's filesystem is full: debugfs said: {said}")
        raise ToolError(f"debugfs failed while finishing {image.name}: {said}")


def new_workdir(near: Path) -> tempfile.TemporaryDirectory[str]:
    """A private temp dir beside the image (same filesystem, removed afterwards)."""
    try:
        return tempfile.TemporaryDirectory(prefix=temp_prefix("debugfs"), dir=near)
    except OSError as exc:
        raise _storage_error(exc, f"cannot create a temp dir in {near}") from exc


def xattr_batch(batch: Batch, fixups: Iterable[tuple[bytes, str, bytes]]) -> None:
    """Queue every ``(path, name, value)`` fixup as an ``ea_set``."""
    for path, name, value in fixups:
        batch.set_xattr(path, name, value)


__all__ = ["Batch", "new_workdir", "quote", "run_batch", "xattr_batch"]
