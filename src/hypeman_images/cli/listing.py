"""What ``list`` prints: docker's image table, its filters and its relative times.

One row per tag (``<none>`` for an image no tag points at), as ``docker
images`` prints it; the default columns fit 80 columns for everyday names,
and the columns that tell images apart only sometimes (``PLATFORM``,
``FORMAT``, ``SOURCE``) appear only when they do.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from hypeman_images.build.image import Image
from hypeman_images.build.progress import human_size
from hypeman_images.cli.output import printable
from hypeman_images.errors import HypemanError
from hypeman_images.oci.reference import Reference, parse_reference
from hypeman_images.store.images import ImageStatus

WIDTH = 80
ID_LENGTH = 12
NONE = "<none>"
# A failure's reason is cut to fit the width, but "failed: interrupted" and
# shorter ones stay whole.
MIN_STATUS = len("failed: interrupted")


def short_id(image: Image) -> str:
    """The image's ID as ``list`` prints it: the first 12 hex digits of its digest."""
    return image.digest.partition(":")[2][:ID_LENGTH]


@dataclass(frozen=True)
class RepositoryFilter:
    """``list``'s REPOSITORY[:TAG] argument: the repository, and the tag when one was typed."""

    ref: Reference
    tag: str | None

    @classmethod
    def parse(cls, text: str) -> RepositoryFilter:
        """``alpine`` matches every tag of docker.io/library/alpine, ``alpine:3.20`` one."""
        ref = parse_reference(text)
        typed_tag = ":" in text.rsplit("/", 1)[-1].split("@", 1)[0]
        return cls(ref, ref.tag if typed_tag else None)

    def matches(self, image: Image) -> bool:
        """True if ``image`` is in the repository (under the tag, when one was typed)."""
        if image.repository != self.ref.name:
            return False
        if self.ref.digest is not None and image.digest != str(self.ref.digest):
            return False
        return self.tag is None or self.tag in image.local_names


def ago(timestamp: str, now: datetime | None = None) -> str:
    """``2 hours ago``: an RFC 3339 time as the time since, in its largest whole unit."""
    try:
        then = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return printable(timestamp) or "-"
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    seconds = max(0, int(((now or datetime.now(UTC)) - then).total_seconds()))
    if seconds < 2:
        return "just now"
    # Each unit until two of the next one (docker's go-units does the same).
    unit, length = next((u, n) for u, n, up_to in _UNITS if seconds < up_to)
    count = seconds // length
    return f"{count} {unit}{'' if count == 1 else 's'} ago"


_DAY = 86400
_UNITS = (
    ("second", 1, 60),
    ("minute", 60, 3600),
    ("hour", 3600, 2 * _DAY),
    ("day", _DAY, 14 * _DAY),
    ("week", 7 * _DAY, 60 * _DAY),
    ("month", 30 * _DAY, 730 * _DAY),
    ("year", 365 * _DAY, float("inf")),
)


def status_text(image: Image) -> str:
    """``ready``, ``pending (#2)``, ``failed: <why>``."""
    status = str(image.status)
    if image.queue_position:
        status += f" (#{image.queue_position})"
    if image.error:
        status += f": {image.error}"
    return status


def table_rows(images: Sequence[Image], now: datetime | None = None) -> list[tuple[str, ...]]:
    """The header and one row per tag of each image (``<none>`` when untagged).

    ``PLATFORM`` only when the images are for more than one platform,
    ``FORMAT`` when their disks are of more than one (ext4, erofs), and
    ``SOURCE`` only when a disk came from elsewhere than a build here (the
    disk cache): columns that would say the same on every row are left out.
    """
    platforms = {image.platform for image in images if image.platform}
    extra = [("PLATFORM", _platform)] if len(platforms) > 1 else []
    if len({str(image.format) for image in images}) > 1:
        extra.append(("FORMAT", lambda image: str(image.format)))
    if any(_source(image) not in ("build", "-") for image in images):
        extra.append(("SOURCE", _source))
    header = ("REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE")
    rows: list[tuple[str, ...]] = [(*header, *(name for name, _ in extra), "STATUS")]
    for image in images:
        repository = _familiar(image.repository)
        size = human_size(image.size_bytes) if image.size_bytes else "-"
        for tag in image.local_names or (NONE,):
            row = (repository, tag, short_id(image), ago(image.created_at, now), size)
            cells = (*row, *(cell(image) for _, cell in extra), status_text(image))
            rows.append(tuple(printable(cell) for cell in cells))
    return rows


def _platform(image: Image) -> str:
    return image.platform or "-"


def _source(image: Image) -> str:
    """``build`` or ``disk-cache`` for a ready image; ``-`` before it is."""
    return image.record.source if image.status is ImageStatus.READY else "-"


def render(rows: Sequence[tuple[str, ...]], width: int = WIDTH) -> Iterable[str]:
    """Aligned columns, two spaces apart; a long status (a failure's reason) is cut to fit."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    start = sum(widths[:-1]) + 2 * (len(widths) - 1)  # where the last column begins
    for row in rows:
        line = "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        last = row[-1]
        if len(line) > width and len(last) > MIN_STATUS:
            line = line[:start] + last[: max(width - 1 - start, MIN_STATUS - 1)] + "…"
        yield line


def _familiar(repository: str) -> str:
    try:
        return parse_reference(repository).with_tag(None).familiar()
    except HypemanError:  # stored names were parsed once; an odd one is shown as it is
        return repository
