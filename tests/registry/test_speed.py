"""The low-speed limit (registry/speed.py) and the manifest deadline, on a mock transport.

The clock is faked where the arithmetic is checked; the client tests use a
transport whose body trickles in real time, with limits small enough to take
a second or two.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from hypeman_images.errors import TransientError
from hypeman_images.oci.reference import Reference
from hypeman_images.registry.client import RegistryClient
from hypeman_images.registry.config import RegistryConfig, load_registries_conf
from hypeman_images.registry.speed import SpeedWatch, TooSlow

REQUEST = httpx.Request("GET", "http://registry.example/v2/")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def fed(watch: SpeedWatch, clock: Clock, steps: list[tuple[float, int]]) -> None:
    for advance, count in steps:
        clock.now += advance
        watch.feed(count)


@pytest.mark.parametrize(
    ("steps", "too_slow"),
    [
        pytest.param([(1.5, 1)] * 4, True, id="a-byte-every-1.5s"),
        pytest.param([(0.1, 200)] * 100, False, id="steady-2000-Bps"),
        pytest.param([(2.9, 1), (0.05, 10_000)], False, id="a-stall-shorter-than-the-window"),
        pytest.param([(0.1, 100_000), *[(1.0, 10)] * 4], True, id="fast-then-a-trickle"),
        pytest.param([(10.0, 1_000_000)], False, id="one-burst-after-a-pause"),
    ],
)
def test_watch(steps: list[tuple[float, int]], too_slow: bool) -> None:
    clock = Clock()
    watch = SpeedWatch(1000, 3.0, REQUEST, clock)
    if too_slow:
        with pytest.raises(TooSlow, match="fewer than 1000 bytes/s"):
            fed(watch, clock, steps)
    else:
        fed(watch, clock, steps)


def test_watch_keeps_few_samples() -> None:
    clock = Clock()
    watch = SpeedWatch(1, 3.0, REQUEST, clock)
    fed(watch, clock, [(0.001, 10)] * 100_000)
    assert len(watch._samples) <= 10


class Trickle(httpx.SyncByteStream):
    """``body`` a byte at a time, ``every`` seconds apart."""

    def __init__(self, body: bytes, every: float) -> None:
        self.body, self.every = body, every

    def __iter__(self) -> Iterator[bytes]:
        for i in range(len(self.body)):
            time.sleep(self.every)
            yield self.body[i : i + 1]


def trickling(every: float) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        body = b'{"schemaVersion": 2, "mediaType": "x"}' * 20
        return httpx.Response(200, stream=Trickle(body, every))

    return httpx.MockTransport(handler)


def test_a_trickling_manifest_fails_as_too_slow() -> None:
    config = RegistryConfig(
        low_speed_limit=100, low_speed_time=0.5, max_attempts=2, backoff_base=0.0
    )
    started = time.monotonic()
    with (
        RegistryClient(transport=trickling(0.05), config=config) as client,
        pytest.raises(TransientError, match=r"too slow.*--low-speed-limit") as caught,
    ):
        client.get_manifest(Reference("registry.example", "a/b", "t"))
    assert time.monotonic() - started < 3
    assert "gave up after 2 attempts" in caught.value.message


def test_the_manifest_deadline_bounds_every_attempt() -> None:
    """A trickle above the low-speed limit still ends at the manifest deadline, not retried."""
    config = RegistryConfig(
        low_speed_limit=0, manifest_timeout=1.0, max_attempts=4, backoff_base=0.0
    )
    started = time.monotonic()
    with (
        RegistryClient(transport=trickling(0.02), config=config) as client,
        pytest.raises(TransientError, match=r"1 s manifest deadline.*--manifest-timeout"),
    ):
        client.get_manifest(Reference("registry.example", "a/b", "t"))
    assert time.monotonic() - started < 2


def test_registries_conf_sets_the_transfer_limits(tmp_path: pytest.TempPathFactory) -> None:
    path = tmp_path / "registries.conf"  # type: ignore[operator]
    path.write_text("low-speed-limit = 512\nlow-speed-time = 5\nmanifest-timeout = 20\n")
    config = load_registries_conf(path)
    assert (config.low_speed_limit, config.low_speed_time, config.manifest_timeout) == (
        512,
        5.0,
        20.0,
    )
