"""An HTTP proxy on 127.0.0.1 that puts faults between the client and a real registry.

The proxy forwards every request to the upstream registry unchanged, except
those a :class:`Fault` matches, which it answers wrongly on purpose:

- ``status``: answer ``status`` (500, 429, ...) without asking upstream;
- ``delay``: wait ``delay`` seconds before the response (a slow registry);
- ``stall``: send the headers and ``after_bytes`` of the body, then go silent
  for ``delay`` seconds before closing (a registry that hangs mid-blob);
- ``cut``: send the headers (with the full ``Content-Length``) and
  ``after_bytes`` of the body, then close the connection (a registry that
  dies mid-pull);
- ``corrupt``: flip one byte of the body at ``after_bytes`` (bit rot, a
  broken cache in the path);
- ``replace``: answer ``body`` with ``status`` and ``headers`` (a hostile
  registry serving documents a real one would refuse to store);
- ``trickle``: send the headers and ``after_bytes`` of the body, then one
  byte every ``delay`` seconds (a registry that is never silent long enough
  for a read timeout); the body is ``body`` with ``status`` and ``headers``
  if ``body`` is set, else upstream's answer.

A fault applies ``times`` times (``None``: forever), then the request passes.
:attr:`FaultProxy.log` records every request with what was done to it, and
:meth:`FaultProxy.die` stops listening, so later connections are refused.
Bodies are read whole before they are sent: test blobs are small.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal
from urllib.parse import urlsplit

Action = Literal["status", "delay", "stall", "cut", "corrupt", "replace", "trickle"]
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "content-length",
}


@dataclass
class Fault:
    """What to do to requests whose path contains ``path`` (and whose method is ``method``)."""

    path: str
    action: Action
    method: str | None = "GET"
    times: int | None = None
    status: int = 500
    delay: float = 0.0
    after_bytes: int = 0
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and method != self.method:
            return False
        if self.path not in path:
            return False
        return self.times is None or self.hits < self.times


@dataclass(frozen=True)
class Logged:
    """One request the proxy saw, and the fault applied to it (``None``: forwarded)."""

    method: str
    path: str
    action: Action | None
    range: str | None


class FaultProxy:
    """A running proxy: ``url`` is ``http://127.0.0.1:PORT``, ``host`` ``127.0.0.1:PORT``."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        assert parts.scheme == "http" and parts.hostname and parts.port
        self.upstream = (parts.hostname, parts.port)
        self.faults: list[Fault] = []
        self.log: list[Logged] = []
        self._lock = threading.Lock()
        self.port = 0
        self._listen()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"

    def _listen(self) -> None:
        self._server = _Server(("127.0.0.1", self.port), _Handler)
        self._server.proxy = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self._dead = False

    def add(self, fault: Fault) -> Fault:
        """Apply ``fault`` from now on (faults added earlier win when several match)."""
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        """Forward everything from now on; the log is kept."""
        with self._lock:
            self.faults.clear()

    def _take(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.hits += 1
                    return fault
        return None

    def _record(self, entry: Logged) -> None:
        with self._lock:
            self.log.append(entry)

    def requests(self, path: str, method: str = "GET") -> list[Logged]:
        """Logged requests whose path contains ``path``."""
        with self._lock:
            return [r for r in self.log if path in r.path and r.method == method]

    def die(self) -> None:
        """Stop listening and drop open connections: the registry is gone."""
        if self._dead:
            return
        self._dead = True
        self._server.shutdown()
        self._server.server_close()
        self._server.close_all()
        self._thread.join(timeout=5)

    def revive(self) -> None:
        """Listen again on the same port: the registry is back."""
        if self._dead:
            self._listen()

    def close(self) -> None:
        self.die()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: FaultProxy

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._sockets: set[socket.socket] = set()
        self._sockets_lock = threading.Lock()

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        with self._sockets_lock:
            self._sockets.add(request)
        super().process_request(request, client_address)  # type: ignore[arg-type]

    def shutdown_request(self, request: socket.socket) -> None:  # type: ignore[override]
        with self._sockets_lock:
            self._sockets.discard(request)
        super().shutdown_request(request)

    def close_all(self) -> None:
        with self._sockets_lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # silence stderr
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_PATCH(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _handle(self) -> None:
        proxy = self.server.proxy
        fault = proxy._take(self.command, self.path)
        proxy._record(
            Logged(self.command, self.path, fault.action if fault else None, self.headers["range"])
        )
        length = int(self.headers.get("content-length") or 0)
        request_body = self.rfile.read(length) if length else b""
        if fault is not None and fault.action == "status":
            body = b'{"errors":[{"code":"UNAVAILABLE","message":"injected fault"}]}'
            self._send(fault.status, {"Content-Type": "application/json"}, body)
            return
        if fault is not None and fault.action == "replace":
            headers = {"Content-Type": "application/octet-stream", **fault.headers}
            self._send(fault.status, headers, fault.body)
            return
        if fault is not None and fault.action == "delay":
            time.sleep(fault.delay)
        if fault is not None and fault.action == "trickle" and fault.body:
            headers = {"Content-Type": "application/octet-stream", **fault.headers}
            self._trickle(fault, fault.status, headers, fault.body)
            return
        status, headers, body = self._forward(request_body)
        if fault is not None and fault.action == "trickle":
            self._trickle(fault, status, headers, body)
            return
        if fault is None or fault.action == "delay":
            self._send(status, headers, body)
        elif fault.action == "corrupt":
            if fault.after_bytes < len(body):
                i = fault.after_bytes
                body = body[:i] + bytes([body[i] ^ 0xFF]) + body[i + 1 :]
            self._send(status, headers, body)
        else:  # cut or stall: promise the whole body, deliver part of it
            self._start(status, headers, len(body))
            self.wfile.write(body[: fault.after_bytes])
            self.wfile.flush()
            if fault.action == "stall":
                time.sleep(fault.delay)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

    def _trickle(self, fault: Fault, status: int, headers: dict[str, str], body: bytes) -> None:
        """``after_bytes`` at once, then a byte every ``fault.delay`` s, until the client goes."""
        self._start(status, headers, len(body))
        self.close_connection = True
        try:
            self.wfile.write(body[: fault.after_bytes])
            self.wfile.flush()
            for i in range(fault.after_bytes, len(body)):
                time.sleep(fault.delay)
                self.wfile.write(body[i : i + 1])
                self.wfile.flush()
        except OSError:
            pass  # the client gave up: what the tests want it to do

    def _forward(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(*self.server.proxy.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            conn.request(self.command, self.path, body=body or None, headers=headers)
            response = conn.getresponse()
            data = response.read()
            out = {k: v for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP}
            if self.command == "HEAD" and response.getheader("content-length"):
                out["Content-Length"] = response.getheader("content-length", "0")
            return response.status, out, data
        finally:
            conn.close()

    def _start(self, status: int, headers: dict[str, str], length: int) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(length))
        self.end_headers()

    def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self._start(status, headers, len(body))
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()


@contextmanager
def fault_proxy(upstream: str) -> Iterator[FaultProxy]:
    """A :class:`FaultProxy` in front of ``upstream`` for the ``with`` block."""
    proxy = FaultProxy(upstream)
    try:
        yield proxy
    finally:
        proxy.close()


def manifest_headers(body: bytes, media_type: str) -> dict[str, str]:
    """What a registry sends with a manifest: its type and its digest."""
    return {
        "Content-Type": media_type,
        "Docker-Content-Digest": "sha256:" + hashlib.sha256(body).hexdigest(),
    }


__all__ = ["Fault", "FaultProxy", "Logged", "fault_proxy", "manifest_headers"]
