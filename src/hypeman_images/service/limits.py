"""What one client may cost the service, and the guard that refuses the rest from the request head.

:class:`RequestGuard` wraps the API as an ASGI middleware and decides on the
request head alone, before one byte of a body is read:

1. a ``Host`` off the allow-list (when there is one) → 421: a page from
   another origin that a DNS rebinding pointed at this host names its own
   host there, and cannot choose the header;
2. a missing or wrong bearer token, on any path but :data:`PUBLIC` → 401;
3. a declared ``Content-Length`` over ``max_body_bytes`` → 413.

Only then is the body read, whole, at most ``max_body_bytes`` within
``body_timeout`` seconds (413, 408), and handed to the app. An answer given
while a body is still unread says ``Connection: close``: uvicorn then closes
the connection instead of reading the rest (it buffers at most about 64 KiB
of a body nobody asked for, then stops reading). The connection-level limits
(the request head's deadline, the number of connections) are
:mod:`.server`'s; :class:`ServiceLimits` holds both, as ``serve``'s flags set
them (docs/security.md, "The API's own limits").
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hypeman_images.oci.wire import decimal
from hypeman_images.service.settings import ServiceLimits
from hypeman_images.service.tokens import WWW_AUTHENTICATE, bearer_matches

# The paths open to all when a token is set: a liveness probe has no token
# (``/health`` is hypeman's name for it).
PUBLIC = frozenset({"/healthz", "/health"})
# Names of this host that a browser only sends to this host.
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})


def host_name(value: str) -> str:
    """The host part of a ``Host`` header or an ``--allowed-host``: no port, lower case.

    IPv6 addresses are bracketed (``[::1]``), as a ``Host`` header writes them.
    """
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[: end + 1] if end != -1 else value
    if value.count(":") > 1:
        return f"[{value}]"
    return value.partition(":")[0]


def allowed_hosts(bound: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """The loopback names, the address ``serve`` is bound to, and ``extra``."""
    return LOOPBACK_HOSTS | {host_name(bound)} | {host_name(h) for h in extra if h.strip()}


class RequestGuard:
    """Refuse from the request head what can be refused there; read a body only after.

    ``token``: the bearer token every path but ``public`` needs (None: none).
    ``hosts``: the ``Host`` names answered (None: any).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        token: str | None,
        limits: ServiceLimits,
        hosts: frozenset[str] | None = None,
        public: frozenset[str] = PUBLIC,
    ) -> None:
        self._app = app
        self._token = token.encode() if token is not None else None
        self._limits = limits
        self._hosts = hosts
        self._public = public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        has_body = headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
        refusal = self._check_head(scope, headers)
        if refusal is None and has_body:
            body, refusal = await self._read_body(receive)
            if refusal is None and body is None:
                return  # the client went away
            receive = _replay(body or b"", receive)
        if refusal is not None:
            if has_body:
                refusal.headers["Connection"] = "close"
            await refusal(scope, receive, send)
            return
        await self._app(scope, receive, send)

    def _check_head(self, scope: Scope, headers: Headers) -> JSONResponse | None:
        if self._hosts is not None and host_name(headers.get("host", "")) not in self._hosts:
            return _refusal(
                421,
                "misdirected_request",
                "this server does not answer for that Host; serve --allowed-host adds one",
            )
        if (
            self._token is not None
            and scope["path"] not in self._public
            and not bearer_matches(self._token, headers.get("authorization"))
        ):
            return _refusal(
                401,
                "unauthorized",
                "missing or invalid bearer token",
                {"WWW-Authenticate": WWW_AUTHENTICATE},
            )
        declared = headers.get("content-length")
        size = decimal(declared) if declared is not None else None
        if declared is not None and (size is None or size > self._max_body):
            return self._too_large()
        return None

    @property
    def _max_body(self) -> int:
        return self._limits.max_body_bytes

    def _too_large(self) -> JSONResponse:
        return _refusal(
            413, "body_too_large", f"request bodies are limited to {self._max_body} bytes"
        )

    async def _read_body(self, receive: Receive) -> tuple[bytes | None, JSONResponse | None]:
        """The whole body, or the refusal to send instead; (None, None) if the client left."""
        parts: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self._limits.body_timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None, None
                    chunk: bytes = message.get("body", b"")
                    size += len(chunk)
                    if size > self._max_body:
                        return None, self._too_large()
                    parts.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(parts), None
        except TimeoutError:
            return None, _refusal(
                408,
                "request_timeout",
                f"the request body did not arrive within {self._limits.body_timeout:g} s",
            )


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` once, then waits on the real one (for a disconnect)."""
    given = False

    async def replay() -> Message:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _refusal(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status, headers=headers)


__all__ = [
    "LOOPBACK_HOSTS",
    "PUBLIC",
    "RequestGuard",
    "allowed_hosts",
    "host_name",
]
