"""The columns of :class:`~hypeman_images.build.progress.RichReporter`'s bars that rich lacks.

rich's speed column counts in decimal units and its timer runs for a row
that was finished when it appeared; these count as :func:`human_size` does
and say ``cached`` for a layer that was not downloaded. Imported only when
bars are drawn.
"""

from __future__ import annotations

from rich.progress import ProgressColumn, Task
from rich.text import Text

from hypeman_images.build.progress import human_size


class RateColumn(ProgressColumn):
    """Bytes a second, in binary units; nothing for a cached layer."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if task.fields.get("cached") or speed is None:
            return Text("", style="progress.data.speed")
        return Text(f"{human_size(int(speed))}/s", style="progress.data.speed")


class StateColumn(ProgressColumn):
    """``cached`` for a layer already in the blob cache, else the time the row took (so far)."""

    def render(self, task: Task) -> Text:
        if task.fields.get("cached"):
            return Text("cached", style="progress.elapsed")
        elapsed = task.finished_time if task.finished else task.elapsed
        seconds = int(elapsed or 0)
        minutes, seconds = divmod(seconds, 60)
        hours, minutes = divmod(minutes, 60)
        return Text(f"{hours}:{minutes:02d}:{seconds:02d}", style="progress.elapsed")


__all__ = ["RateColumn", "StateColumn"]
