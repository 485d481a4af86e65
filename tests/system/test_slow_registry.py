"""A registry that trickles: never silent long enough for the read timeout, never done.

The fault proxy (tests/support/faultproxy.py, ``trickle``) sends a byte every
so often. The low-speed limit (registry/speed.py) must end such a transfer
as a ``TransientError``, so a build fails within a bound that the limits set,
and builds queued behind it still run. The limits are small here, so each
test takes seconds; docs/security.md ("Slow registries") gives the defaults.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.faultproxy import Fault, FaultProxy, fault_proxy
from support.hostile import store_problems
from support.images import Image, make_image, make_layer, push_image
from support.registry import RegistryServer
from support.tar import directory, file

from hypeman_images.build.manager import ImageManager
from hypeman_images.registry.client import RegistryClient
from hypeman_images.registry.config import RegistryConfig

# Small enough for a test, and far below what a trickle of a byte per 0.3 s delivers.
SLOW = {"low_speed_limit": 1000, "low_speed_time": 1.0}


def payload_image(tag: str) -> Image:
    base = make_layer([directory("etc"), file("etc/hostname", tag.encode() + b"\n")])
    payload = make_layer([directory("data"), file("data/blob", os.urandom(64 * 1024))])
    return make_image([base, payload], cmd=["/bin/true"])


@pytest.fixture(scope="module")
def images(registry: RegistryServer) -> dict[str, Image]:
    pushed = {}
    for tag in ("slow1", "slow2", "quick"):
        pushed[tag] = payload_image(tag)
        push_image(registry.url, f"trickle/{tag}", "v1", pushed[tag])
    return pushed


@pytest.fixture
def proxy(registry: RegistryServer) -> Iterator[FaultProxy]:
    with fault_proxy(registry.url) as running:
        yield running


def manager(data_dir: Path, concurrency: int = 2, **config: float) -> ImageManager:
    settings = {
        "backoff_base": 0.0,
        "max_attempts": 2,
        "resume_attempts": 1,
        "read_timeout": 3.0,
        **config,
    }

    def client() -> RegistryClient:
        return RegistryClient(config=RegistryConfig(**settings))  # type: ignore[arg-type]

    return ImageManager(data_dir, client_factory=client, concurrency=concurrency)


def test_a_trickling_blob_fails_within_the_limit(
    images: dict[str, Image], proxy: FaultProxy, data_dir: Path
) -> None:
    """A byte every 1.5 s under a 3 s read timeout: only the low-speed limit ends it."""
    image = images["slow1"]
    proxy.add(Fault(f"/blobs/{image.layers[1].digest}", "trickle", after_bytes=100, delay=1.5))
    started = time.monotonic()
    with manager(data_dir, **SLOW) as m:
        m.create(f"{proxy.host}/trickle/slow1:v1")
        done = m.wait(f"{proxy.host}/trickle/slow1:v1", timeout=20)
        elapsed = time.monotonic() - started
        assert done.status == "failed", (done.status, elapsed)
        assert "too slow" in (done.error or ""), done.error
    assert elapsed < 15
    assert store_problems(data_dir) == []


def test_two_trickling_builds_do_not_starve_the_queue(
    images: dict[str, Image], proxy: FaultProxy, data_dir: Path
) -> None:
    """Both build slots trickle; the build queued behind them still runs, soon."""
    for tag in ("slow1", "slow2"):
        layer = images[tag].layers[1].digest
        proxy.add(Fault(f"/blobs/{layer}", "trickle", after_bytes=100, delay=0.3))
    names = [f"{proxy.host}/trickle/{tag}:v1" for tag in ("slow1", "slow2", "quick")]
    started = time.monotonic()
    with manager(data_dir, concurrency=2, **SLOW) as m:
        for name in names:
            m.create(name)
        quick = m.wait(names[2], timeout=20)
        assert quick.status == "ready", quick
        assert time.monotonic() - started < 15
        for name in names[:2]:
            slow = m.wait(name, timeout=20)
            assert slow.status == "failed" and "too slow" in (slow.error or ""), slow
    assert store_problems(data_dir) == []
