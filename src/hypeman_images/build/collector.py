"""Python's cyclic garbage collector made rare while builds run.

A build makes several Python objects per layer entry (headers, entries, the
tree's nodes: hundreds of thousands for a large image) and puts none of them
in a reference cycle, so reference counting frees them all and the young
collections, one per 700 new objects by default, walk them for nothing: with
collections fifty thousand objects apart the large image of ``bench/`` builds
as fast as with none (docs/performance.md). Not none: the service's event
loop goes on making cyclic garbage (exceptions, futures) while builds run,
possibly back to back.

Builds overlap in the service, so a count says when the last one ends; the
thresholds the program had are then restored, and a collector it disabled
stays disabled.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

# Young objects between collections while a build runs (CPython's default: 700).
BUILD_THRESHOLD = 50_000

_lock = threading.Lock()
_builds = 0
_saved: tuple[int, int, int] = (700, 10, 10)


@contextlib.contextmanager
def collect_rarely() -> Iterator[None]:
    """Young collections :data:`BUILD_THRESHOLD` objects apart until the last of the
    overlapping ``collect_rarely()`` blocks ends."""
    global _builds, _saved
    with _lock:
        if _builds == 0:
            _saved = gc.get_threshold()
            if _saved[0] < BUILD_THRESHOLD:
                gc.set_threshold(BUILD_THRESHOLD, *_saved[1:])
        _builds += 1
    try:
        yield
    finally:
        with _lock:
            _builds -= 1
            if _builds == 0:
                gc.set_threshold(*_saved)
