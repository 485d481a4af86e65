"""Python's cyclic garbage collector paused while builds run.

A build makes several Python objects per layer entry (headers, entries, the
tree's nodes: ~10 per entry, hundreds of thousands for a large image) and
puts none of them in a reference cycle, so reference counting frees them
all and every collection finds nothing; yet each one walks the young
objects, and now and then all of them. Paused, the large image of
``bench/`` builds ~3 % sooner (issue 7); the hostile million-entry image
far sooner, as its full collections walk ten million objects.

Builds overlap in the service, so a count says when the last one ends; a
collector that the embedding program had disabled stays disabled.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_builds = 0
_was_enabled = False


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No cyclic collection until the last of the overlapping ``paused()`` blocks ends."""
    global _builds, _was_enabled
    with _lock:
        if _builds == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _builds += 1
    try:
        yield
    finally:
        with _lock:
            _builds -= 1
            if _builds == 0 and _was_enabled:
                gc.enable()
