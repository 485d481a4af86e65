"""The request guard (service/limits.py): refusals from the request head, bodies bounded.

The app runs on a real uvicorn in a thread; the clients are raw sockets
(support/rawhttp.py), so a test can send a head and hold back its body, and
tell "answered without reading the body" from "read it, then answered".
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.rawhttp import connect, head, read_answer
from support.service import serve_in_thread

from hypeman_images.build.manager import ImageManager
from hypeman_images.service.limits import allowed_hosts, host_name
from hypeman_images.service.settings import ServiceLimits

TOKEN = "t0ken-for-the-guard"
GOOD = {"Authorization": f"Bearer {TOKEN}"}
TEN_MB = 10 * 1024 * 1024


@pytest.fixture
def guarded(data_dir: Path) -> Iterator[str]:
    limits = ServiceLimits(max_body_bytes=64 * 1024, body_timeout=1.0)
    with (
        ImageManager(data_dir) as manager,
        serve_in_thread(manager, token=TOKEN, limits=limits) as base,
    ):
        yield base


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-token"),
        pytest.param({"Authorization": "Bearer wrong"}, id="wrong-token"),
        pytest.param({"Authorization": f"Basic {TOKEN}"}, id="token-as-basic"),
    ],
)
def test_an_unauthenticated_body_is_refused_before_it_is_sent(
    guarded: str, headers: dict[str, str]
) -> None:
    """A 10 MB POST without the token: 401 from the head alone, and the connection closes."""
    with connect(guarded) as sock:
        request = {"Content-Type": "application/json", "Content-Length": str(TEN_MB), **headers}
        sock.sendall(head("POST", "/images", request))
        answer = read_answer(sock, timeout=3)  # not one byte of the body was sent
        assert answer.status == 401
        assert answer.headers["connection"] == "close"
        assert answer.headers["www-authenticate"].startswith("Bearer")
        assert sock.recv(1) == b""


def test_a_declared_body_over_the_limit_is_413_before_it_is_sent(guarded: str) -> None:
    with connect(guarded) as sock:
        request = {"Content-Type": "application/json", "Content-Length": str(TEN_MB), **GOOD}
        sock.sendall(head("POST", "/images", request))
        answer = read_answer(sock, timeout=3)
        assert answer.status == 413 and b"body_too_large" in answer.body
        assert answer.headers["connection"] == "close"


def test_a_chunked_body_stops_at_the_limit(guarded: str) -> None:
    """No Content-Length to refuse: the guard reads up to the limit, then answers 413."""
    with connect(guarded) as sock:
        request = {"Content-Type": "application/json", "Transfer-Encoding": "chunked", **GOOD}
        sock.sendall(head("POST", "/images", request))
        chunk = b"x" * 16384
        for _ in range(5):  # 80 KiB: over the 64 KiB limit
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        answer = read_answer(sock, timeout=3)
        assert answer.status == 413


def test_a_body_that_never_ends_is_408(guarded: str) -> None:
    with connect(guarded) as sock:
        request = {"Content-Type": "application/json", "Content-Length": "100", **GOOD}
        sock.sendall(head("POST", "/images", request) + b'{"name": ')
        started = time.monotonic()
        answer = read_answer(sock, timeout=5)
        assert answer.status == 408 and b"request_timeout" in answer.body
        assert 0.9 < time.monotonic() - started < 3


def test_a_small_body_with_the_token_still_reaches_the_route(guarded: str) -> None:
    with httpx.Client(timeout=10) as client:
        answer = client.post(f"{guarded}/images", json={"name": "../x"}, headers=GOOD)
        assert answer.status_code == 400 and answer.json()["code"] == "invalid_name"
        # A keep-alive connection: the answer to a read body does not close it.
        assert answer.headers.get("connection") != "close"
        assert client.get(f"{guarded}/healthz").status_code == 200


# -- Host ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "name"),
    [
        ("localhost:8080", "localhost"),
        ("LOCALHOST", "localhost"),
        ("127.0.0.1", "127.0.0.1"),
        ("[::1]:8080", "[::1]"),
        ("::1", "[::1]"),
        ("evil.example:8080", "evil.example"),
        ("", ""),
    ],
)
def test_host_name(value: str, name: str) -> None:
    assert host_name(value) == name


@pytest.fixture
def loopback_only(data_dir: Path) -> Iterator[str]:
    hosts = allowed_hosts("127.0.0.1", ["build-box.internal"])
    with ImageManager(data_dir) as manager, serve_in_thread(manager, hosts=hosts) as base:
        yield base


@pytest.mark.parametrize(
    ("host", "status"),
    [
        pytest.param("127.0.0.1:8080", 200, id="loopback-address"),
        pytest.param("localhost", 200, id="localhost"),
        pytest.param("[::1]:8080", 200, id="ipv6-loopback"),
        pytest.param("build-box.internal:80", 200, id="allowed-host"),
        pytest.param("attacker.example:8080", 421, id="rebound-name"),
        pytest.param("127.0.0.1.attacker.example", 421, id="loopback-lookalike"),
        pytest.param("", 421, id="empty"),
    ],
)
def test_host_allow_list(loopback_only: str, host: str, status: int) -> None:
    """A page that a DNS rebinding pointed at 127.0.0.1 still sends its own name as Host."""
    for path in ("/images", "/healthz", "/docs"):
        with connect(loopback_only) as sock:
            sock.sendall(head("GET", path, {"Host": host}))
            answer = read_answer(sock, timeout=3)
            assert answer.status == status, (path, host, answer)
            if status == 421:
                assert b"misdirected_request" in answer.body
