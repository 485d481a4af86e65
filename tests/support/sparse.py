"""Sparse files as GNU tar ``--sparse`` stores them, in each of its formats.

The members are made by the real GNU tar from a real file with holes, so the
tests read what images built with ``tar --sparse`` carry: the old GNU ``S``
type (``--format=gnu``) and the PAX formats 0.0, 0.1 and 1.0
(``--format=posix --sparse-version=...``). :func:`content` is the file they
were made from, byte for byte, holes read as zeros.
"""

from __future__ import annotations

import functools
import os
import subprocess
import tempfile
from pathlib import Path

# --format and --sparse-version for each format GNU tar writes.
_PAX = ("--format=posix", "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime")
FORMATS: dict[str, tuple[str, ...]] = {
    "gnu": ("--format=gnu",),
    "pax-0.0": (*_PAX, "--sparse-version=0.0"),
    "pax-0.1": (*_PAX, "--sparse-version=0.1"),
    "pax-1.0": (*_PAX, "--sparse-version=1.0"),
}
# (offset, data) runs of the file; everything else is a hole. Runs of 4 KiB and more
# at block-aligned offsets stay data whatever hole detection the filesystem offers.
Runs = tuple[tuple[int, bytes], ...]
RUNS: Runs = ((0, b"head" * 2048), (1 << 20, b"\x01middle\xff" * 1024), ((5 << 19), b"t" * 4096))
SIZE = (3 << 20) + 100  # ends in a hole


def content(runs: Runs = RUNS, size: int = SIZE) -> bytes:
    """The file's bytes as any reader sees them: the runs, zeros elsewhere."""
    data = bytearray(size)
    for offset, run in runs:
        data[offset : offset + len(run)] = run
    return bytes(data)


@functools.cache
def member(name: str, fmt: str, runs: Runs = RUNS, size: int = SIZE, mode: int = 0o640) -> bytes:
    """One member of ``fmt`` (a :data:`FORMATS` key) storing the file, no end-of-archive.

    Owners are 0:0 and the mtime 1000; PAX atime/ctime records are left out
    and the PAX header names are fixed, so only the GNUSparseFile.<pid> name
    GNU tar gives formats 0.1 and 1.0 (overridden by ``GNU.sparse.name``) varies.
    """
    with tempfile.TemporaryDirectory(prefix="sparse-") as tmp:
        path = Path(tmp) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as out:
            out.truncate(size)
            for offset, run in runs:
                out.seek(offset)
                out.write(run)
        path.chmod(mode)
        os.utime(path, (1000, 1000))
        argv = [
            "tar", "--create", "--sparse", *FORMATS[fmt], "--numeric-owner", "--owner=0",
            "--group=0", "--directory", tmp, "--file", "-", name,
        ]  # fmt: skip
        tar = subprocess.run(argv, check=True, capture_output=True).stdout
    end = len(tar)
    while end >= 512 and tar[end - 512 : end] == bytes(512):
        end -= 512  # the end-of-archive blocks: the member goes into a layer of our own
    return tar[:end]
