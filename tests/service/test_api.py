"""The REST API on a real uvicorn (127.0.0.1, thread) through httpx, against the test registry."""

from __future__ import annotations

import http.client
import json
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from support.fleet import cache_repo
from support.hosts import host
from support.pushed import PushedImage
from support.service import serve_in_thread, serve_process, wait_for_status

from hypeman_images import ImageManager
from hypeman_images.build.metrics import parse
from hypeman_images.service.api import openapi_document

OPENAPI = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
REGENERATE = ".venv/bin/python -m hypeman_images.service.api > docs/openapi.json"


@pytest.fixture
def api(data_dir: Path) -> Iterator[tuple[str, ImageManager]]:
    with ImageManager(data_dir) as manager, serve_in_thread(manager) as base:
        yield base, manager


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as c:
        yield c


def raw_request(base: str, method: str, path: str) -> tuple[int, dict[str, Any]]:
    """Send ``path`` byte for byte (httpx would normalise dot segments)."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        body = response.read()
        return response.status, json.loads(body) if body else {}
    finally:
        conn.close()


def test_create_poll_get_list_delete(
    api: tuple[str, ImageManager], client: httpx.Client, alpine_ref: PushedImage
) -> None:
    base, _ = api
    response = client.post(f"{base}/images", json={"name": alpine_ref.ref})
    assert response.status_code == 202, response.text
    created = response.json()
    assert created["status"] in ("pending", "pulling", "converting")
    assert created["digest"] == alpine_ref.manifest_digest
    assert created["name"] == alpine_ref.ref

    ready = wait_for_status(client, base, quote(alpine_ref.ref, safe=""), {"ready", "failed"})
    assert ready["status"] == "ready", ready["error"]
    assert ready["size_bytes"] > 0 and ready["queue_position"] is None
    assert ready["cmd"] == ["/bin/sh"] and ready["env"]["PATH"].startswith("/usr/local")
    assert ready["local_names"] == ["3.20.3"] and ready["platform"] == "linux/amd64"
    assert ready["tags"] == {}  # hypeman's tags: the user's labels, none asked for here
    assert ready["source"] == {"kind": "build", "repository": None, "artifact": None}

    # The same image by digest, with the name unescaped ('/', ':' and '@' in the path).
    by_digest = client.get(f"{base}/images/{alpine_ref.digest_ref}")
    assert by_digest.status_code == 200 and by_digest.json()["digest"] == ready["digest"]

    listed = client.get(f"{base}/images").json()
    assert [i["digest"] for i in listed] == [alpine_ref.manifest_digest]
    assert listed[0]["size_bytes"] == ready["size_bytes"]

    assert client.delete(f"{base}/images/{alpine_ref.ref}").status_code == 204
    gone = client.get(f"{base}/images/{alpine_ref.ref}")
    assert gone.status_code == 404 and gone.json()["code"] == "not_found"
    assert client.get(f"{base}/images").json() == []


def test_twenty_concurrent_posts_make_one_build(
    api: tuple[str, ImageManager], alpine_ref: PushedImage
) -> None:
    base, _ = api
    barrier = threading.Barrier(20)

    def post(_: int) -> httpx.Response:
        with httpx.Client(timeout=30) as c:
            barrier.wait()
            return c.post(f"{base}/images", json={"name": alpine_ref.ref})

    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(post, range(20)))
    assert {r.status_code for r in responses} == {202}
    assert {r.json()["digest"] for r in responses} == {alpine_ref.manifest_digest}
    with httpx.Client(timeout=30) as c:
        wait_for_status(c, base, alpine_ref.ref, {"ready"})
        metrics = parse(c.get(f"{base}/metrics").text)
    assert metrics["hypeman_images_builds_started_total"] == 1
    assert metrics['hypeman_images_builds_total{outcome="success"}'] == 1
    assert metrics["hypeman_images_pulled_bytes_total"] > 0


@pytest.mark.parametrize(
    "path",
    [
        "/images/..%2F..%2F..%2Fvictim",
        "/images/%2e%2e%2f%2e%2e%2f%2e%2e%2fvictim",
        "/images/%2E%2E/%2E%2E/victim",
        "/images/../../victim",
        "/images/library/UPPER",
        "/images/alpine@sha256:1234",
        "/images/%20",
    ],
    ids=[
        "encoded-slash",
        "encoded-dots",
        "encoded-dots-upper",
        "raw-dots",
        "upper",
        "bad-digest",
        "space",
    ],
)
@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_invalid_names_are_400_and_touch_nothing(
    api: tuple[str, ImageManager], tmp_path: Path, data_dir: Path, path: str, method: str
) -> None:
    base, _ = api
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("x")
    status, body = raw_request(base, method, path)
    # Raw '..' segments may be resolved by the server before routing; then the
    # path names no route at all (404). Either way nothing is touched.
    assert status in ((400, 404) if path.startswith("/images/..") else (400,)), body
    if status == 400:
        assert body["code"] == "invalid_name" and body["message"]
    assert (victim / "keep").read_text() == "x"
    assert sorted(p.name for p in data_dir.iterdir()) == ["cache", "images"]


def test_bad_bodies_are_400(api: tuple[str, ImageManager], client: httpx.Client) -> None:
    base, _ = api
    for body in ({"name": "UPPER/Case"}, {"name": ""}, {}, {"name": 3}, {"nom": "alpine"}):
        response = client.post(f"{base}/images", json=body)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["code"] in ("invalid_request", "invalid_name")
        assert set(response.json()) <= {"code", "message", "details"}
    response = client.post(f"{base}/images", content=b"not json")
    assert response.status_code == 400


def test_unknown_names_are_404(
    api: tuple[str, ImageManager], client: httpx.Client, alpine_ref: PushedImage
) -> None:
    base, _ = api
    host = alpine_ref.registry.host
    for method, path in (
        ("GET", f"/images/{host}/library/alpine:never"),
        ("DELETE", f"/images/{host}/library/alpine:never"),
        ("GET", f"/images/{host}/library/alpine@sha256:{'a' * 64}"),
        ("GET", "/nowhere"),
    ):
        response = client.request(method, f"{base}{path}")
        assert response.status_code == 404, (path, response.text)
        assert response.json()["code"] == "not_found"
    response = client.post(f"{base}/images", json={"name": f"{host}/no/such-repo:1"})
    assert response.status_code == 404 and response.json()["code"] == "not_found"


def test_delete_while_building_is_409(
    data_dir: Path, client: httpx.Client, alpine_ref: PushedImage
) -> None:
    release = threading.Event()
    from hypeman_images.build.pipeline import build_resolved

    def held(resolved: Any, **kwargs: Any) -> Any:
        assert release.wait(30)
        return build_resolved(resolved, **kwargs)

    with ImageManager(data_dir, builder=held) as manager, serve_in_thread(manager) as base:
        assert client.post(f"{base}/images", json={"name": alpine_ref.ref}).status_code == 202
        response = client.delete(f"{base}/images/{alpine_ref.ref}")
        assert response.status_code == 409 and response.json()["code"] == "conflict"
        release.set()
        wait_for_status(client, base, alpine_ref.ref, {"ready"})
        assert client.delete(f"{base}/images/{alpine_ref.ref}").status_code == 204


def test_bearer_token(data_dir: Path, client: httpx.Client) -> None:
    token = "s3cret-token"
    with ImageManager(data_dir) as manager, serve_in_thread(manager, token=token) as base:
        routes = [
            ("GET", "/images"),
            ("POST", "/images"),
            ("GET", "/metrics"),
            ("DELETE", "/images/alpine"),
            ("GET", "/images/alpine"),
        ]
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {token}"}):
            for method, path in routes:
                response = client.request(method, f"{base}{path}", headers=headers, json={})
                assert response.status_code == 401, (method, path, headers)
                assert response.json()["code"] == "unauthorized"
                assert response.headers["www-authenticate"].startswith("Bearer")
        good = {"Authorization": f"Bearer {token}"}
        assert client.get(f"{base}/images", headers=good).json() == []
        assert client.get(f"{base}/healthz").status_code == 200
        # The API's documents are behind the token too (docs/security.md, "Who can reach the API").
        for path in ("/openapi.json", "/docs", "/redoc", "/no-such-path"):
            assert client.get(f"{base}{path}").status_code == 401, path
        assert client.get(f"{base}/openapi.json", headers=good).status_code == 200
        assert client.get(f"{base}/docs", headers=good).status_code == 200


def test_metrics_exposition(api: tuple[str, ImageManager], client: httpx.Client) -> None:
    base, _ = api
    response = client.get(f"{base}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    for family, kind in (
        ("builds_total", "counter"),
        ("build_duration_seconds", "histogram"),
        ("pulled_bytes_total", "counter"),
        ("cache_hits_total", "counter"),
        ("queue_length", "gauge"),
        ("builds_active", "gauge"),
    ):
        assert f"# TYPE hypeman_images_{family} {kind}\n" in text
    samples = parse(text)
    assert samples['hypeman_images_build_duration_seconds_bucket{le="+Inf"}'] == 0
    assert samples["hypeman_images_queue_length"] == 0


def test_healthz(api: tuple[str, ImageManager], client: httpx.Client) -> None:
    base, _ = api
    assert client.get(f"{base}/healthz").json() == {"status": "ok"}


def test_openapi_in_repo_matches_served(
    api: tuple[str, ImageManager], client: httpx.Client
) -> None:
    base, _ = api
    served = client.get(f"{base}/openapi.json").json()
    assert served == openapi_document()
    assert OPENAPI.is_file(), f"docs/openapi.json is missing; regenerate: {REGENERATE}"
    assert json.loads(OPENAPI.read_text()) == served, (
        f"docs/openapi.json is stale; regenerate: {REGENERATE}"
    )
    assert set(served["paths"]) == {
        "/images", "/images/{name}", "/images/{name}/tag", "/capabilities",
        "/health", "/healthz", "/metrics",
    }  # fmt: skip


@pytest.mark.slow
def test_serve_verbose_never_logs_the_token(
    alpine_ref: PushedImage, data_dir: Path, tmp_path: Path, client: httpx.Client
) -> None:
    """``serve -v`` logs every request and debug lines, but never the bearer token."""
    token = f"tok-{secrets.token_hex(16)}"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    log = tmp_path / "serve.log"
    good = {"Authorization": f"Bearer {token}"}
    with serve_process(data_dir, log, "-v", "--token-file", str(token_file)) as served:
        base = served.url
        answers = []
        # Unauthenticated, and the token where it does not belong (Basic, no scheme).
        for headers in ({}, {"Authorization": f"Basic {token}"}, {"Authorization": token}):
            answers.append(client.get(f"{base}/images", headers=headers))
            answers.append(client.post(f"{base}/images", headers=headers, json={"name": "x"}))
        assert {a.status_code for a in answers} == {401}
        # Authenticated: a whole build, a listing, an unknown and an invalid name.
        created = client.post(f"{base}/images", headers=good, json={"name": alpine_ref.ref})
        assert created.status_code == 202, created.text
        deadline = time.monotonic() + 60
        while client.get(f"{base}/images/{alpine_ref.ref}", headers=good).json()["status"] != (
            "ready"
        ):
            assert time.monotonic() < deadline, served.output()
            time.sleep(0.1)
        answers.append(client.get(f"{base}/images", headers=good))
        answers.append(client.get(f"{base}/images/nope:1", headers=good))
        answers.append(client.post(f"{base}/images", headers=good, json={"name": "../x"}))
        answers.append(client.get(f"{base}/metrics", headers=good))
        assert [a.status_code for a in answers[-4:]] == [200, 404, 400, 200]
    output = served.output()
    # -v took effect: access lines and debug lines are there to look through.
    assert "method=POST path=/images status=401" in output
    assert "method=POST path=/images status=202" in output
    assert "level=debug" in output, output[-2000:]
    assert token not in output
    assert all(token not in a.text for a in answers)
    for meta in data_dir.rglob("metadata.json"):
        assert token not in meta.read_text()


def test_the_tags_filter_is_a_deep_object(
    api: tuple[str, ImageManager], client: httpx.Client
) -> None:
    base, _ = api
    # The SDK's form (hypeman/_qs.py: brackets, URL-encoded) and the same written plainly.
    for query in (
        "tags%5Bteam%5D=a&tags%5Benv%5D=b",
        "tags[team]=a&tags[env]=b",
        "tags[team]=a&tags[team]=a",
    ):
        response = client.get(f"{base}/images?{query}")
        assert (response.status_code, response.json()) == (200, []), query
    for query in ("tags=team", "tags[team]=a&tags[team]=b"):
        response = client.get(f"{base}/images?{query}")
        assert response.status_code == 400, query
        assert response.json()["code"] == "invalid_argument"


def test_an_image_says_its_disk_came_from_the_disk_cache(
    tmp_path: Path, client: httpx.Client, alpine_ref: PushedImage
) -> None:
    """``source``, our extension: null until ready, then ``build`` or ``disk-cache``
    with the repository and the artifact, as metadata.json records them."""
    repo = cache_repo(alpine_ref.registry.host, "api-source")
    with host(tmp_path / "builder", repo) as builder:
        builder.pull(alpine_ref.ref)  # built and pushed (leaving drains the push)
    with host(tmp_path / "served", repo) as manager, serve_in_thread(manager) as base:
        created = client.post(f"{base}/images", json={"name": alpine_ref.ref}).json()
        assert created["status"] == "ready" or created["source"] is None
        ready = wait_for_status(client, base, quote(alpine_ref.ref, safe=""), {"ready", "failed"})
        record = json.loads(next((tmp_path / "served").rglob("metadata.json")).read_text())
    assert ready["status"] == "ready", ready["error"]
    assert ready["source"] == {
        "kind": "disk-cache",
        "repository": repo.name,
        "artifact": record["source_artifact"],
    }
    assert record["source"] == "disk-cache" and record["source_artifact"].startswith("sha256:")
