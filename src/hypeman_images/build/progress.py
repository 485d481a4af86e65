"""Progress on long work: rich bars on a terminal, plain lines when piped.

The pipeline reports through :class:`Reporter`; the library default is silent.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TYPE_CHECKING, TextIO

from hypeman_images.build.observer import PullObserver
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
    """Live bars on a terminal: one per layer, one for the conversion.

    The units are :func:`human_size`'s, as in :class:`PlainReporter`'s lines;
    names and digests are printed as text, never read as rich markup or
    highlighted. A cached layer says so instead of running a timer, and every
    bar stands at 100 % once the image is ready.
    """

    def __init__(self, console: Console | None = None) -> None:
        # Imported here: piped output and the library never draw, and rich
        # costs a CLI start ~25 ms.
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

        from hypeman_images.build.columns import RateColumn, StateColumn

        self._progress = Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            DownloadColumn(binary_units=True),
            RateColumn(),
            StateColumn(),
            console=console or Console(stderr=True, highlight=False),
            transient=False,
        )
        self._tasks: dict[Digest, TaskID] = {}
        self._totals: dict[TaskID, int] = {}
        self._convert: TaskID | None = None
        self._progress.start()

    def stage(self, stage: str, detail: str = "") -> None:
        from rich.text import Text

        if stage == "ready":
            self._complete()
        line = Text.assemble((stage, "bold"), f" {detail}" if detail else "")
        self._progress.console.print(line, highlight=False)

    def start(self, digest: Digest, size: int, cached: bool) -> None:
        task = self._progress.add_task(digest.short, total=size, cached=cached)
        self._tasks[digest] = task
        self._totals[task] = size
        if cached:  # finished at once: the clock stops, the row says "cached"
            self._progress.update(task, completed=size)

    def advance(self, digest: Digest, nbytes: int) -> None:
        self._progress.advance(self._tasks[digest], nbytes)

    def done(self, digest: Digest) -> None:
        task = self._tasks.get(digest)
        if task is not None:
            self._finish(task)

    def converted(self, nbytes: int, total: int) -> None:
        if self._convert is None:
            self._convert = self._progress.add_task("converting", total=total)
        self._totals[self._convert] = total
        self._progress.update(self._convert, completed=nbytes, total=total)

    def close(self) -> None:
        self._progress.stop()

    def _complete(self) -> None:
        for task in self._totals:
            self._finish(task)

    def _finish(self, task: TaskID) -> None:
        self._progress.update(task, completed=self._totals[task])


def human_size(size: int) -> str:
    """``1.5 MiB``: binary units, one decimal."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
