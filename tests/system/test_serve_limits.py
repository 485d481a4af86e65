"""``serve`` against hostile clients: big bodies, slow heads, connection floods, no fds left.

The server is the real thing, ``hypeman-images serve`` in a subprocess
(support/service.py); the clients are raw sockets (support/rawhttp.py) on
127.0.0.1, a bounded number of them. Limits are small so each test takes
seconds; docs/security.md ("The API's own limits") gives the defaults.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.rawhttp import closed_by_peer, connect, head, read_answer
from support.service import ServeProcess, serve_process

TOKEN = "serve-limits-token"
TEN_MB = 10 * 1024 * 1024


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@contextlib.contextmanager
def serving(tmp_path: Path, *args: str) -> Iterator[ServeProcess]:
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    log = tmp_path / "serve.log"
    with serve_process(tmp_path / "data", log, "--token-file", str(token), *args) as served:
        yield served


def test_unauthenticated_big_bodies_are_not_read(tmp_path: Path) -> None:
    """Twenty 10 MB POSTs without the token: 401s, and the server's memory does not notice."""
    with serving(tmp_path) as served:
        pid = served.process.pid
        assert httpx.get(f"{served.url}/healthz").status_code == 200
        before = status_kib(pid, "VmHWM")
        answers: list[int | str] = []

        def post() -> None:
            with connect(served.url, timeout=10) as sock:
                request = {"Content-Type": "application/json", "Content-Length": str(TEN_MB)}
                sock.sendall(head("POST", "/images", request))
                sender = threading.Thread(target=_send_quietly, args=(sock, b"x" * TEN_MB))
                sender.start()
                try:
                    answers.append(read_answer(sock, timeout=10).status)
                except OSError as exc:  # reset: the server closed with the body unread
                    answers.append(type(exc).__name__)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sender.join(10)

        clients = [threading.Thread(target=post) for _ in range(20)]
        for client in clients:
            client.start()
        for client in clients:
            client.join(30)
        grown = status_kib(pid, "VmHWM") - before
        assert len(answers) == 20 and 401 in answers, answers
        assert set(answers) <= {401, "ConnectionResetError"}, answers
        assert grown < 40 * 1024, f"VmHWM grew by {grown} kB for 200 MB of refused bodies"
        assert httpx.get(f"{served.url}/healthz").status_code == 200


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(data)


def test_slow_heads_are_dropped_after_the_header_timeout(tmp_path: Path) -> None:
    """A hundred clients that send a header line every 0.3 s, forever: closed after 1 s."""
    with serving(tmp_path, "--header-timeout", "1") as served:
        slow = [connect(served.url) for _ in range(100)]
        try:
            for sock in slow:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            started = time.monotonic()
            while time.monotonic() - started < 3:
                for sock in slow:
                    with contextlib.suppress(OSError):
                        sock.sendall(b"X-Slow: 1\r\n")
                time.sleep(0.3)
            still_open = [s for s in slow if not closed_by_peer(s, 0.2)]
            assert still_open == [], f"{len(still_open)} slow clients still connected"
        finally:
            for sock in slow:
                sock.close()
        assert httpx.get(f"{served.url}/healthz").status_code == 200


def test_the_408_says_why(tmp_path: Path) -> None:
    with serving(tmp_path, "--header-timeout", "0.5") as served, connect(served.url) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        assert read_answer(sock, timeout=3).status == 408


def test_beyond_max_connections_clients_wait_in_the_backlog(tmp_path: Path) -> None:
    """Four idle connections fill --max-connections 4: the fifth waits, not 503, until one goes."""
    with serving(tmp_path, "--max-connections", "4", "--header-timeout", "30") as served:
        idle = [connect(served.url) for _ in range(4)]
        try:
            time.sleep(0.5)
            with connect(served.url) as waiting:
                waiting.sendall(head("GET", "/healthz", {}))
                with pytest.raises(TimeoutError):
                    read_answer(waiting, timeout=1.5)
                idle.pop().close()
                assert read_answer(waiting, timeout=5).status == 200
        finally:
            for sock in idle:
                sock.close()


def test_out_of_file_descriptors_is_quiet_and_recovers(tmp_path: Path) -> None:
    """At the open-file limit, accept fails: a line or two of log, no loop, and back after."""
    with serving(tmp_path) as served:
        pid = served.process.pid
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (open_fds(pid) + 4, hard))
        logged = len(served.output())
        flood = []
        try:
            for _ in range(60):  # the kernel completes these; serve can accept only a few
                flood.append(connect(served.url))
            time.sleep(4)
            output = served.output()[logged:]
            assert "cannot accept connections: Too many open files" in output, output[-2000:]
            assert len(output) < 2000, f"{len(output)} bytes of log in 4 s:\n{output[-2000:]}"
        finally:
            for sock in flood:
                sock.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        deadline = time.monotonic() + 10
        while True:
            try:
                if httpx.get(f"{served.url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, served.output()[-2000:]
            time.sleep(0.2)
        assert served.process.poll() is None
