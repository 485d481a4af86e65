"""Measuring child processes: wall time, peak RSS, bytes written; cold caches; disk usage.

Peak RSS and bytes written come from the ``rusage`` that ``wait4`` returns for
one child. On Linux that rusage covers the child and every descendant it
waited for: ``ru_maxrss`` is the largest of their peaks (so the CLI's figure
includes its mke2fs), and ``ru_oublock`` is their ``write_bytes`` of
``/proc/<pid>/io`` in 512-byte units: the bytes they dirtied for the storage
layer, whether or not writeback happened before they exited.

A forked child starts with a copy of its parent's RSS high-water mark (it
survives the exec), so a child of this big benchmark process would report at
least this process's peak. The peak RSS is therefore taken through
``/usr/bin/time -f %M`` (a small process that forks the command) when it is
installed; without it the figure is an upper bound.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Run:
    """One measured process (or a sum over a sequence of them)."""

    seconds: float
    max_rss: int  # bytes; the largest single process
    written: int  # bytes dirtied for the storage layer
    cpu: float  # user + system seconds
    output: bytes = field(default=b"", repr=False, compare=False)  # stdout + stderr

    def __add__(self, other: Run) -> Run:
        return Run(
            self.seconds + other.seconds,
            max(self.max_rss, other.max_rss),
            self.written + other.written,
            self.cpu + other.cpu,
        )


ZERO = Run(0.0, 0, 0, 0.0)
TIME = "/usr/bin/time"
_MAXRSS = "BENCH_TIME_MAXRSS_KB="


class CommandFailed(RuntimeError):
    """A measured command exited non-zero; the message has its output's tail."""


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Run:
    """Run ``argv`` to completion; its wall time and the rusage of its process tree."""
    command = [os.fspath(a) for a in argv]
    if os.access(TIME, os.X_OK):
        command = [TIME, "-f", _MAXRSS + "%M", *command]
    started = time.perf_counter()
    with subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(env) if env is not None else None,
        cwd=cwd,
    ) as proc:
        assert proc.stdout is not None
        output = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise CommandFailed(
            f"{' '.join(map(str, argv))} exited {proc.returncode}:\n"
            + output.decode(errors="replace")[-3000:]
        )
    max_rss = usage.ru_maxrss * 1024
    for line in output.decode(errors="replace").splitlines():
        if line.startswith(_MAXRSS):
            max_rss = int(line[len(_MAXRSS) :]) * 1024
    return Run(
        seconds,
        max_rss,
        usage.ru_oublock * 512,
        usage.ru_utime + usage.ru_stime,
        output,
    )


def drop_caches() -> bool:
    """``sync`` and drop the page cache (root only); False if not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
    except OSError:
        return False
    return True


def _block_stat(path: Path) -> Path | None:
    """``/sys/dev/block/M:m/stat`` of the device holding ``path``, if there is one."""
    dev = os.stat(path).st_dev
    stat = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat")
    return stat if stat.exists() else None


class DeviceWrites:
    """Bytes the block device under ``path`` wrote between :meth:`start` and :meth:`stop`.

    Counts every process on the machine, so it is a cross-check of the rusage
    figure, not a replacement; :meth:`stop` syncs first so writeback is in.
    """

    def __init__(self, path: Path) -> None:
        self._stat = _block_stat(path)
        self._start = 0

    def _sectors(self) -> int:
        if self._stat is None:
            return 0
        return int(self._stat.read_text().split()[6])  # sectors written (block/stat.rst)

    def start(self) -> None:
        os.sync()
        self._start = self._sectors()

    def stop(self) -> int | None:
        os.sync()
        return None if self._stat is None else (self._sectors() - self._start) * 512


def disk_usage(*paths: Path) -> int:
    """Bytes allocated to the files under ``paths`` (``du``-style, symlinks not followed)."""
    total = 0
    for root in paths:
        if not root.exists():
            continue
        total += root.lstat().st_blocks * 512
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                with contextlib.suppress(FileNotFoundError):
                    total += os.lstat(os.path.join(folder, name)).st_blocks * 512
    return total


def median(values: Sequence[float]) -> float:
    """The median (0.0 for no values)."""
    return statistics.median(values) if values else 0.0


def mb(n: float) -> str:
    """``123.4 MB`` (decimal megabytes, as docs/performance.md quotes sizes)."""
    return f"{n / 1e6:,.1f} MB"
