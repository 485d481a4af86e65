"""What ``serve`` logs: one key=value line per request and per build state change.

The lines are logfmt (``time=… level=info logger=… msg="…" key=value…``),
one event a line, so that journald, ``grep`` and log shippers read them
alike. A record's extra fields (``log.info(..., extra={"status": "ready"})``)
become keys. Values that are not plain words are quoted as JSON strings, so a
request path or an error message cannot forge a line or write control
characters to a terminal.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger(__name__)

# The attributes every LogRecord has; anything else on a record came as ``extra``.
# uvicorn's ``color_message`` repeats ``msg`` with terminal colours: never a key.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "color_message",
}
_BARE = re.compile(r"[A-Za-z0-9_.:/@+,-]+")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def logfmt_value(value: object) -> str:
    """``value`` as a logfmt value: bare when it is one plain word, else a JSON string."""
    text = str(value)
    return text if _BARE.fullmatch(text) else json.dumps(text)


class KeyValueFormatter(logging.Formatter):
    """``time=… level=… logger=… msg=…`` and then each extra field of the record."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        fields: dict[str, object] = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields.update(
            (key, value)
            for key, value in vars(record).items()
            if key not in _STANDARD and not key.startswith("_") and value is not None
        )
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        return " ".join(f"{key}={logfmt_value(value)}" for key, value in fields.items())


def configure(verbosity: int) -> None:
    """Log as ``serve`` does: key=value lines; this package at info (debug with ``-v``)."""
    for handler in logging.getLogger().handlers:
        handler.setFormatter(KeyValueFormatter())
    logging.getLogger("hypeman_images").setLevel(logging.DEBUG if verbosity else logging.INFO)


def log_uvicorn_here(verbosity: int) -> None:
    """uvicorn's loggers through :func:`configure`'s handler and format, its access log off.

    Called once uvicorn's ``Config`` has installed its own handlers (it does
    so when made): they go, its lines propagate to ours, at warning unless
    ``-v``; :class:`RequestLog` writes the request lines instead.
    """
    for name in ("uvicorn", "uvicorn.error", "uvicorn.asgi"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
        logger.setLevel(logging.DEBUG if verbosity else logging.WARNING)
    access = logging.getLogger("uvicorn.access")
    access.handlers.clear()
    access.propagate = False


class RequestLog:
    """ASGI middleware: one info line per HTTP request, once its response has started.

    Fields: ``method``, ``path``, ``status``, ``duration_ms`` and ``client``.
    A request whose handler raised is logged with status 500.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            client = scope.get("client")
            log.info(
                "%s %s %d",
                scope["method"],
                scope["path"],
                status,
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round((time.monotonic() - started) * 1000, 1),
                    "client": f"{client[0]}:{client[1]}" if client else None,
                },
            )


__all__ = ["KeyValueFormatter", "RequestLog", "configure", "log_uvicorn_here", "logfmt_value"]
