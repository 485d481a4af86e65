"""The low-speed limit: a response body that trickles fails like a read timeout.

``read_timeout`` bounds a silence, not a trickle: a registry that sends one
byte just before each timeout would hold a pull (and a build slot) forever.
As curl's ``--speed-limit``/``--speed-time``, every response the client reads
goes through :class:`SpeedLimitedTransport`, whose :class:`SpeedWatch`
raises :class:`TooSlow` once fewer than ``low_speed_limit`` bytes per second
arrived over the last ``low_speed_time`` seconds. ``TooSlow`` is an
``httpx.ReadTimeout``, so what already handles a timeout handles it: a blob
download resumes with ``Range`` (bounded by ``resume_attempts``), a request is
retried (bounded by ``max_attempts``), and :mod:`.retry` names the flags.

The watch looks at the clock when bytes arrive; a silence in between is the
read timeout's business.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator

import httpx


class TooSlow(httpx.ReadTimeout):
    """A response body arrived slower than the low-speed limit."""


class SpeedWatch:
    """Raises :class:`TooSlow` when ``feed`` sees under ``limit`` B/s over ``window`` seconds.

    The rate is taken over the last ``window`` seconds or a little more (one
    sample is kept every ``window / 8`` seconds), never over less: a short
    stall is not a slow transfer.
    """

    def __init__(
        self,
        limit: int,
        window: float,
        request: httpx.Request,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limit = limit
        self._window = window
        self._request = request
        self._clock = clock
        self._total = 0
        # (when, bytes received by then), oldest first.
        self._samples: deque[tuple[float, int]] = deque([(clock(), 0)])

    def feed(self, count: int) -> None:
        """``count`` more bytes arrived now."""
        now = self._clock()
        self._total += count
        samples = self._samples
        while len(samples) > 1 and samples[1][0] <= now - self._window:
            samples.popleft()
        since, before = samples[0]
        elapsed = now - since
        if elapsed >= self._window and self._total - before < self._limit * elapsed:
            raise TooSlow(
                f"fewer than {self._limit} bytes/s over the last {elapsed:.0f} s "
                f"({self._total - before} bytes)",
                request=self._request,
            )
        if now - samples[-1][0] >= self._window / 8:
            samples.append((now, self._total))


class _WatchedStream(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream, watch: SpeedWatch) -> None:
        self._inner = inner
        self._watch = watch

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            self._watch.feed(len(chunk))
            yield chunk

    def close(self) -> None:
        self._inner.close()


class SpeedLimitedTransport(httpx.BaseTransport):
    """``inner`` with every response body under the low-speed limit (``limit`` 0: off)."""

    def __init__(self, inner: httpx.BaseTransport, limit: int, window: float) -> None:
        self._inner = inner
        self._limit = limit
        self._window = window

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self._inner.handle_request(request)
        if self._limit <= 0:
            return response
        stream = response.stream
        assert isinstance(stream, httpx.SyncByteStream)
        watch = SpeedWatch(self._limit, self._window, request)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_WatchedStream(stream, watch),
            extensions=response.extensions,
            request=request,
        )

    def close(self) -> None:
        self._inner.close()


__all__ = ["SpeedLimitedTransport", "SpeedWatch", "TooSlow"]
