"""HTTP/1.1 byte by byte, for clients that misbehave on purpose (slow, oversized, half-sent).

httpx and http.client send whole, well-formed requests; these helpers let a
test send a head without its body, trickle a head, or hold a connection,
and read whatever answer comes within a timeout.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


def connect(url: str, timeout: float = 5.0) -> socket.socket:
    """A TCP connection to ``url``'s host and port."""
    parts = urlsplit(url)
    assert parts.hostname and parts.port
    return socket.create_connection((parts.hostname, parts.port), timeout=timeout)


def head(method: str, path: str, headers: dict[str, str]) -> bytes:
    """A request head; ``Host`` is added if missing."""
    lines = [f"{method} {path} HTTP/1.1"]
    if not any(k.lower() == "host" for k in headers):
        lines.append("Host: 127.0.0.1")
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_answer(sock: socket.socket, timeout: float) -> Answer:
    """The next answer on ``sock``; ``TimeoutError`` if none is whole within ``timeout``."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before an answer: {data!r}")
        data += chunk
    top, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = top.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return Answer(int(status_line.split()[1]), headers, body)


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True if the server closes ``sock`` within ``timeout`` (whatever it sent first)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True  # reset
    return True


__all__ = ["Answer", "closed_by_peer", "connect", "head", "read_answer"]
