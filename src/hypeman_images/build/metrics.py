"""Service metrics in the Prometheus text exposition format (version 0.0.4), by hand.

A handful of counters and one histogram do not justify a client library: the
format is lines of ``name{labels} value`` under ``# HELP`` and ``# TYPE``
(https://prometheus.io/docs/instrumenting/exposition_formats/). Each
:class:`Metrics` belongs to one manager; there is no process-wide registry.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "hypeman_images"
# Build times run from a cached re-tag (milliseconds) to multi-GiB images (minutes).
BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
OUTCOMES = ("success", "failure")
CACHE_KINDS = ("image", "blob")
DISK_CACHE_RESULTS = ("hit", "miss", "fallback")


@dataclass(frozen=True)
class QueueGauges:
    """The queue's state when metrics are scraped."""

    queue_length: int
    active_builds: int


class Metrics:
    """Counters of one manager's builds. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started = 0
        self._builds = dict.fromkeys(OUTCOMES, 0)
        self._bucket_counts = [0] * len(BUCKETS)
        self._seconds_sum = 0.0
        self._seconds_count = 0
        self._pulled_bytes = 0
        self._cache_hits = dict.fromkeys(CACHE_KINDS, 0)
        self._disk_cache = DiskCacheCounts()

    def build_started(self) -> None:
        """A build left the queue and began."""
        with self._lock:
            self._started += 1

    def build_finished(
        self, outcome: str, seconds: float, pulled_bytes: int, cached_blobs: int
    ) -> None:
        """A build ended with ``outcome`` (``success`` or ``failure``) after ``seconds``."""
        with self._lock:
            self._builds[outcome] += 1
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    self._bucket_counts[i] += 1
            self._seconds_sum += seconds
            self._seconds_count += 1
            self._pulled_bytes += pulled_bytes
            self._cache_hits["blob"] += cached_blobs

    def image_reused(self) -> None:
        """A request was answered by a disk that was already built (no download, no build)."""
        with self._lock:
            self._cache_hits["image"] += 1

    def disk_cache_used(self, result: str | None, reason: str | None, fetched_bytes: int) -> None:
        """A build looked in the disk cache: ``hit``, ``miss`` or ``fallback`` (``reason``)."""
        if result is None:
            return
        with self._lock:
            counts = self._disk_cache
            counts.lookups[result] += 1
            if result == "fallback":
                label = reason or "unknown"
                counts.fallbacks[label] = counts.fallbacks.get(label, 0) + 1
            counts.fetched_bytes += fetched_bytes

    def disk_pushed(self, ok: bool, pushed_bytes: int) -> None:
        """A disk built here was pushed to the disk cache (or the push failed)."""
        with self._lock:
            self._disk_cache.pushes["success" if ok else "failure"] += 1
            self._disk_cache.pushed_bytes += pushed_bytes

    def builds(self, outcome: str) -> int:
        """How many builds ended with ``outcome`` so far."""
        with self._lock:
            return self._builds[outcome]

    def render(self, gauges: QueueGauges) -> str:
        """The exposition text for a scrape."""
        with self._lock:
            lines: list[str] = []
            _family(lines, "builds_started_total", "counter", "Builds that left the queue.")
            lines.append(f"{PREFIX}_builds_started_total {self._started}")
            _family(lines, "builds_total", "counter", "Builds finished, by outcome.")
            for outcome, count in self._builds.items():
                lines.append(f'{PREFIX}_builds_total{{outcome="{outcome}"}} {count}')
            _family(lines, "build_duration_seconds", "histogram", "Wall time of finished builds.")
            for bound, count in zip(BUCKETS, self._bucket_counts, strict=True):
                lines.append(f'{PREFIX}_build_duration_seconds_bucket{{le="{bound}"}} {count}')
            name = f"{PREFIX}_build_duration_seconds"
            lines.append(f'{name}_bucket{{le="+Inf"}} {self._seconds_count}')
            lines.append(f"{name}_sum {self._seconds_sum:.6f}")
            lines.append(f"{name}_count {self._seconds_count}")
            _family(
                lines, "pulled_bytes_total", "counter", "Blob bytes downloaded from registries."
            )
            lines.append(f"{PREFIX}_pulled_bytes_total {self._pulled_bytes}")
            _family(
                lines,
                "cache_hits_total",
                "counter",
                "Work avoided: ready disks reused (image) and layers already cached (blob).",
            )
            for kind, count in self._cache_hits.items():
                lines.append(f'{PREFIX}_cache_hits_total{{kind="{kind}"}} {count}')
            self._disk_cache.render(lines)
        _family(lines, "queue_length", "gauge", "Builds waiting for a free slot.")
        lines.append(f"{PREFIX}_queue_length {gauges.queue_length}")
        _family(lines, "builds_active", "gauge", "Builds running now.")
        lines.append(f"{PREFIX}_builds_active {gauges.active_builds}")
        return "\n".join(lines) + "\n"


class DiskCacheCounts:
    """The disk cache's counters (docs/disk-artifacts.md); :class:`Metrics` holds the lock."""

    def __init__(self) -> None:
        self.lookups = dict.fromkeys(DISK_CACHE_RESULTS, 0)
        self.fallbacks: dict[str, int] = {}  # by the code of the error that caused them
        self.pushes = dict.fromkeys(OUTCOMES, 0)
        self.fetched_bytes = 0
        self.pushed_bytes = 0

    def render(self, lines: list[str]) -> None:
        name = f"{PREFIX}_disk_cache"
        _family(
            lines,
            "disk_cache_lookups_total",
            "counter",
            "Builds that looked in the disk cache: a disk fetched (hit), none there (miss), "
            "or built here after a failure (fallback).",
        )
        for result, count in self.lookups.items():
            lines.append(f'{name}_lookups_total{{result="{result}"}} {count}')
        _family(lines, "disk_cache_fallbacks_total", "counter", "Fallbacks, by the error's code.")
        for reason, count in sorted(self.fallbacks.items()):
            lines.append(f'{name}_fallbacks_total{{reason="{reason}"}} {count}')
        _family(lines, "disk_cache_pushes_total", "counter", "Disks pushed, by outcome.")
        for outcome, count in self.pushes.items():
            lines.append(f'{name}_pushes_total{{outcome="{outcome}"}} {count}')
        _family(lines, "disk_cache_bytes_total", "counter", "Compressed disk bytes, by direction.")
        lines.append(f'{name}_bytes_total{{direction="fetched"}} {self.fetched_bytes}')
        lines.append(f'{name}_bytes_total{{direction="pushed"}} {self.pushed_bytes}')


def _family(lines: list[str], name: str, kind: str, help_text: str) -> None:
    lines.append(f"# HELP {PREFIX}_{name} {help_text}")
    lines.append(f"# TYPE {PREFIX}_{name} {kind}")


def parse(text: str) -> dict[str, float]:
    """Samples of an exposition text by ``name{labels}`` (for tests and health checks)."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


__all__ = ["CONTENT_TYPE", "Metrics", "QueueGauges", "parse"]
