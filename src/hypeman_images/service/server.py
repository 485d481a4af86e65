"""uvicorn with the connection-level limits it lacks: ``serve``'s HTTP server.

uvicorn (h11) bounds a request head's size (16 KiB) and an idle keep-alive
connection (5 s), but not the time a client takes to send a head: one that
trickles a header a minute holds its connection forever. And it accepts
every connection the kernel hands it, so enough of those exhaust the file
descriptors; then asyncio's accept loop logs a traceback for every retry.
:class:`GuardedServer` replaces uvicorn's listener with an :class:`Acceptor`
and its protocol with :class:`GuardedH11Protocol`:

- a whole request head must arrive within ``header_timeout`` seconds of the
  connection, or of the previous answer on it; else the connection is closed
  (with a 408 if part of a head came);
- at most ``max_connections`` are open; the acceptor takes no more until one
  closes, and the kernel's listen backlog holds the rest (backpressure, not
  503s);
- when ``accept`` fails for want of descriptors or memory (EMFILE, ENFILE,
  ENOBUFS, ENOMEM), the acceptor waits, doubling the wait up to
  :data:`MAX_ACCEPT_BACKOFF`, and logs one line per :data:`LOG_EVERY` seconds
  at most, with how many it did not log. At start, :func:`fd_headroom` raises
  the soft open-file limit toward what ``max_connections`` needs (as Go's
  runtime does), so that this stays the exception.

The request-level limits (token, Host, body size and deadline) are
:mod:`.limits`'; :class:`~.limits.ServiceLimits` carries both.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import socket
import sys
import time
from collections.abc import Callable

import h11
import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.h11_impl import H11Protocol

from hypeman_images.service.settings import ServiceLimits

log = logging.getLogger(__name__)

# accept() errors that mean "not now": the process or the host is out of something.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# accept() errors about one connection that died in the backlog: take the next.
_CONNECTION_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
MIN_ACCEPT_BACKOFF = 0.05
MAX_ACCEPT_BACKOFF = 2.0
LOG_EVERY = 30.0
# Descriptors kept for everything but connections: builds (blobs, pipes to mke2fs,
# registry connections), the data dir's locks, the event loop.
FD_RESERVE = 256
_TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class ThrottledLog:
    """A warning at most every ``interval`` seconds; the ones held back are counted."""

    def __init__(self, logger: logging.Logger, interval: float = LOG_EVERY) -> None:
        self._logger = logger
        self._interval = interval
        self._last = -interval
        self._held = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self._interval:
            self._held += 1
            return
        if self._held:
            message += f" ({self._held} more like it in the last {self._interval:g} s)"
        self._logger.warning(message, *args)
        self._last, self._held = now, 0


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head; ``on_close`` at the end."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: uvicorn.server.ServerState,
        app_state: dict[str, object],
        *,
        header_timeout: float,
        on_close: Callable[[], None],
    ) -> None:
        super().__init__(config, server_state, app_state)
        self._header_timeout = header_timeout
        self._on_close = on_close
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        try:
            super().connection_lost(exc)
        finally:
            on_close, self._on_close = self._on_close, _nothing
            on_close()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:
            self._cancel_head_deadline()  # the head is in

    def on_response_complete(self) -> None:
        # Armed first: a pipelined request that the call below parses disarms it.
        if not self.transport.is_closing():
            self._await_head()
        super().on_response_complete()

    def _await_head(self) -> None:
        self._cancel_head_deadline()
        self._head_deadline = self.loop.call_later(self._header_timeout, self._head_timed_out)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:
            self.transport.write(_TIMED_OUT)  # part of a head came: say why
        self.transport.close()


def _nothing() -> None:
    pass


class Acceptor:
    """Accept on ``sock`` while fewer than ``limit`` connections are open; back off when short."""

    def __init__(
        self,
        sock: socket.socket,
        protocol: Callable[[Callable[[], None]], asyncio.Protocol],
        limit: int,
    ) -> None:
        self._sock = sock
        self._protocol = protocol
        self._limit = limit
        self._log = ThrottledLog(log)

    async def run(self) -> None:
        """Accept until cancelled."""
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self._limit)
        backoff = MIN_ACCEPT_BACKOFF
        self._sock.setblocking(False)
        while True:
            await slots.acquire()
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as exc:
                slots.release()
                if exc.errno in _CONNECTION_ERRNOS:
                    continue
                if exc.errno not in _RESOURCE_ERRNOS:
                    raise
                self._log.warning(
                    "cannot accept connections: %s; accepting again in %.2f s, "
                    "then backing off up to %g s (raise the open-file limit, "
                    "ulimit -n, or lower --max-connections)",
                    exc.strerror,
                    backoff,
                    MAX_ACCEPT_BACKOFF,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_ACCEPT_BACKOFF)
                continue
            backoff = MIN_ACCEPT_BACKOFF
            await self._start(loop, conn, slots.release)

    async def _start(
        self, loop: asyncio.AbstractEventLoop, conn: socket.socket, release: Callable[[], None]
    ) -> None:
        """Hand ``conn`` to a new protocol, which calls ``release`` when it closes."""
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.connect_accepted_socket(lambda: self._protocol(release), sock=conn)
        except OSError as exc:
            conn.close()
            release()
            self._log.warning("dropped a new connection: %s", exc.strerror or exc)


class GuardedServer(uvicorn.Server):
    """uvicorn's server, accepting through :class:`Acceptor`s with :class:`GuardedH11Protocol`.

    Serves only the sockets handed to :meth:`run` (``serve`` binds its own).
    """

    def __init__(self, config: uvicorn.Config, limits: ServiceLimits) -> None:
        super().__init__(config)
        self._limits = limits
        self._acceptors: list[asyncio.Task[None]] = []

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if not sockets:
            raise ValueError("GuardedServer serves the sockets it is given, and was given none")
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            sys.exit(STARTUP_FAILURE)
        config, limits = self.config, self._limits

        def protocol(on_close: Callable[[], None]) -> asyncio.Protocol:
            return GuardedH11Protocol(
                config,
                self.server_state,
                self.lifespan.state,
                header_timeout=limits.header_timeout,
                on_close=on_close,
            )

        self.servers = []
        for sock in sockets:
            acceptor = Acceptor(sock, protocol, limits.max_connections)
            task = asyncio.create_task(acceptor.run(), name=f"accept {sock.getsockname()}")
            task.add_done_callback(self._acceptor_ended)
            self._acceptors.append(task)
        self.started = True

    def _acceptor_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("stopped accepting connections: %s", task.exception())
            self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for task in self._acceptors:
            task.cancel()
        await asyncio.gather(*self._acceptors, return_exceptions=True)
        await super().shutdown(sockets)


def fd_headroom(max_connections: int) -> None:
    """Raise the soft open-file limit to fit ``max_connections`` and :data:`FD_RESERVE`.

    Up to the hard limit; short of it, a warning names the two ways out.
    """
    wanted = max_connections + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
        soft = raised
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning(
            "the open-file limit (%d) leaves builds few descriptors beside %d connections; "
            "raise it (ulimit -n) or lower --max-connections",
            soft,
            max_connections,
        )


def http_server(app: object, limits: ServiceLimits, *, verbose: bool) -> GuardedServer:
    """The server for ``app``: uvicorn's settings as ``serve`` wants them, and ``limits``."""
    fd_headroom(limits.max_connections)
    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        http="h11",
        log_level="info" if verbose else "warning",
        access_log=verbose,
    )
    return GuardedServer(config, limits)


__all__ = [
    "Acceptor",
    "GuardedH11Protocol",
    "GuardedServer",
    "ThrottledLog",
    "fd_headroom",
    "http_server",
]
