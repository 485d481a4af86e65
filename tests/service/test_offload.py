"""A slow registry does not freeze the API (service/offload.py, the manifest deadline).

Every manifest comes through the fault proxy a byte per second, never silent
long enough for a read timeout. Fifty ``POST /images`` for such names are
more than FastAPI's shared thread pool has threads; while they wait on the
registry, ``/healthz``, a 401 and ``GET /images`` must still answer at once,
and the POSTs must end at the manifest deadline with a 502 that says so.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from support.faultproxy import Fault, FaultProxy, fault_proxy
from support.registry import RegistryServer
from support.service import serve_in_thread

from hypeman_images.build.manager import ImageManager
from hypeman_images.registry.client import RegistryClient
from hypeman_images.registry.config import RegistryConfig

TOKEN = "offload-token"
GOOD = {"Authorization": f"Bearer {TOKEN}"}
POSTS = 50
DEADLINE = 2.0
MANIFEST = b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"}'


@pytest.fixture
def trickling(registry: RegistryServer) -> Iterator[FaultProxy]:
    with fault_proxy(registry.url) as proxy:
        headers = {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}
        proxy.add(
            Fault("/manifests/", "trickle", status=200, body=MANIFEST, headers=headers, delay=1.0)
        )
        yield proxy


def test_slow_manifests_leave_the_api_answering(trickling: FaultProxy, data_dir: Path) -> None:
    def client() -> RegistryClient:
        config = RegistryConfig(manifest_timeout=DEADLINE, backoff_base=0.0, max_attempts=1)
        return RegistryClient(config=config)

    names = [f"{trickling.host}/slow/app:v{i}" for i in range(POSTS)]
    with (
        ImageManager(data_dir, client_factory=client) as manager,
        serve_in_thread(manager, token=TOKEN) as base,
        httpx.Client(timeout=60, limits=httpx.Limits(max_connections=POSTS + 5)) as http,
        ThreadPoolExecutor(POSTS) as posters,
    ):
        started = time.monotonic()
        posts = [
            posters.submit(http.post, f"{base}/images", json={"name": n}, headers=GOOD)
            for n in names
        ]
        time.sleep(0.5)  # the POSTs are in, waiting on the registry
        for method, path, headers, status in (
            ("GET", "/healthz", {}, 200),
            ("GET", "/images", {}, 401),
            ("POST", "/images", {}, 401),
            ("GET", "/images", GOOD, 200),
            ("GET", "/metrics", GOOD, 200),
        ):
            asked = time.monotonic()
            answer = http.request(method, f"{base}{path}", headers=headers, timeout=5)
            assert answer.status_code == status, (method, path, answer.text)
            assert time.monotonic() - asked < 1.0, (method, path)
        assert not any(p.done() for p in posts), "the registry was meant to be slow"
        answers = [p.result(timeout=60) for p in posts]
        elapsed = time.monotonic() - started
    assert {a.status_code for a in answers} == {502}
    assert all("manifest deadline" in a.json()["message"] for a in answers), answers[0].text
    # Each POST ends at its deadline; they wait for a thread of their own pool, in waves.
    assert elapsed < 5 * DEADLINE * 2, elapsed
