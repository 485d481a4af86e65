"""Progress on long work: rich bars on a terminal, plain lines when piped.

The pipeline reports through :class:`Reporter`; the library default is silent.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TYPE_CHECKING, TextIO

from hypeman_images.build.pull import PullObserver
from hypeman_images.oci.digest import Digest

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import TaskID


class Reporter(PullObserver):
    """Stage changes and conversion progress, on top of a pull's per-layer downloads."""

    def stage(self, stage: str, detail: str = "") -> None:
        """The build entered ``stage`` (pulling, converting, …)."""

    def converted(self, nbytes: int, total: int) -> None:
        """``nbytes`` of ``total`` tar bytes have gone into the disk."""

    def close(self) -> None:
        """Stop drawing."""


class PlainReporter(Reporter):
    """One line per event, for logs and pipes."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stderr
        self._lock = threading.Lock()
        self._last_convert = 0.0
        self._said_total = False

    def _say(self, line: str) -> None:
        with self._lock:
            print(line, file=self.out, flush=True)

    def stage(self, stage: str, detail: str = "") -> None:
        self._say(f"{stage}: {detail}" if detail else stage)

    def start(self, digest: Digest, size: int, cached: bool) -> None:
        state = "cached" if cached else f"downloading {human_size(size)}"
        self._say(f"layer {digest.short}: {state}")

    def done(self, digest: Digest) -> None:
        self._say(f"layer {digest.short}: done")

    def converted(self, nbytes: int, total: int) -> None:
        now = time.monotonic()
        finished = nbytes >= total
        # Every 2 s while it runs, and the end once (writers may report it twice).
        if (finished and not self._said_total) or (not finished and now - self._last_convert > 2):
            self._last_convert = now
            self._said_total = finished
            self._say(f"converting: {human_size(nbytes)} of {human_size(total)}")


class RichReporter(Reporter):
    """Live bars on a terminal: one per layer, one for the conversion."""

    def __init__(self, console: Console | None = None) -> None:
        # Imported here: piped output and the library never draw, and rich
        # costs a CLI start ~25 ms.
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeElapsedColumn(),
            console=console or Console(stderr=True),
            transient=False,
        )
        self._tasks: dict[Digest, TaskID] = {}
        self._convert: TaskID | None = None
        self._progress.start()

    def stage(self, stage: str, detail: str = "") -> None:
        self._progress.console.print(f"[bold]{stage}[/bold] {detail}".rstrip())

    def start(self, digest: Digest, size: int, cached: bool) -> None:
        label = f"{digest.short} {'(cached)' if cached else ''}".rstrip()
        self._tasks[digest] = self._progress.add_task(label, total=size, completed=size * cached)

    def advance(self, digest: Digest, nbytes: int) -> None:
        self._progress.advance(self._tasks[digest], nbytes)

    def converted(self, nbytes: int, total: int) -> None:
        if self._convert is None:
            self._convert = self._progress.add_task("converting", total=total)
        self._progress.update(self._convert, completed=nbytes, total=total)

    def close(self) -> None:
        self._progress.stop()


def human_size(size: int) -> str:
    """``1.5 MiB``: binary units, one decimal."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
