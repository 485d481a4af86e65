"""Which scheme each registry host is spoken to with: HTTPS, or plain HTTP when allowed.

A host that is not insecure (see :meth:`RegistryConfig.verifies_tls`) gets
HTTPS with its certificate verified, and nothing else: it is never downgraded.

An insecure host gets what docker's ``insecure-registries`` and
containers-registries.conf(5)'s ``insecure = true`` give it: HTTPS without
certificate verification if it offers TLS, else plain HTTP. Docker's "Test an
insecure registry" page puts it as "first, try using HTTPS; if HTTPS is
available but the certificate is invalid, ignore the error; if HTTPS is not
available, fall back to HTTP", and containers/image pings ``/v2/`` over
HTTPS, then over HTTP (``docker_client.go``, ``detectProperties``). The first
request to such a host decides with one ``GET /v2/``, answered or not:

* any HTTP answer over TLS, whatever its status: HTTPS (unverified);
* a failed TLS handshake (the server answered in plain text, closed or reset
  the connection, or offered nothing we accept): plain HTTP, at once, so a
  plain-HTTP registry on loopback pays one refused handshake;
* no connection at all (refused, unreachable, timed out; a port-less host
  may serve HTTPS on 443 and HTTP on 80): plain HTTP if ``GET /v2/`` over it
  answers 200 or 401, as the Distribution API's version check does; else a
  ``TransientError``, and nothing is remembered, so a retry probes again.

The decision holds for the client's life (threads wait for one probe per
host), unless a connection to the host fails: the registry may have restarted
speaking another way, so :meth:`Schemes.forget` makes the retry probe again.
"""

from __future__ import annotations

import logging
import ssl
import threading

import httpx

from hypeman_images.errors import TransientError
from hypeman_images.registry.config import RegistryConfig

log = logging.getLogger(__name__)

# The Distribution API's version check answers these (distribution-spec, "end-1").
_REGISTRY_PING_STATUSES = frozenset({200, 401})


class Schemes:
    """Per-host scheme decisions of one registry client. Thread-safe.

    ``http`` is the client's own ``httpx.Client``: the probe goes through the
    same transport (and connection pool) as the requests that follow it.
    """

    def __init__(self, config: RegistryConfig, http: httpx.Client) -> None:
        self._config = config
        self._http = http
        self._decided: dict[str, str] = {}
        self._probing: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def scheme(self, host: str) -> str:
        """``https`` or ``http`` for ``host`` (``host[:port]``), probing an insecure host once.

        Raises ``TransientError`` if an insecure host answers neither way.
        """
        decided = self._decided.get(host)
        if decided is not None:
            return decided
        if self._config.verifies_tls(host):
            return self._remember(host, "https")
        with self._lock:
            probing = self._probing.setdefault(host, threading.Lock())
        with probing:
            decided = self._decided.get(host)
            if decided is None:
                decided = self._remember(host, self._probe(host))
        return decided

    def forget(self, host: str) -> None:
        """Drop the decision for ``host``: a connection to it failed; the next request probes."""
        with self._lock:
            self._decided.pop(host, None)

    def _remember(self, host: str, scheme: str) -> str:
        with self._lock:
            self._decided[host] = scheme
        return scheme

    def _probe(self, host: str) -> str:
        try:
            self._ping("https", host)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.ProxyError) as exc:
            failed = _tls_failure(exc)
            if failed is not None:
                log.info("%s: insecure registry without TLS (%s); using plain HTTP", host, failed)
                return "http"
            https_error: httpx.TransportError = exc
        except httpx.TransportError as exc:
            # The handshake succeeded; what went wrong after it is the requests' business.
            log.debug("%s: /v2/ over HTTPS failed after the handshake: %r", host, exc)
            return _https(host)
        else:
            return _https(host)
        try:
            status = self._ping("http", host)
        except httpx.TransportError as exc:
            raise TransientError(
                f"{host}: cannot connect over HTTPS ({self._describe(https_error)}) "
                f"or plain HTTP ({self._describe(exc)})",
                hint=_timeout_hint(https_error, exc),
            ) from exc
        if status not in _REGISTRY_PING_STATUSES:
            raise TransientError(
                f"{host}: cannot connect over HTTPS ({self._describe(https_error)}), "
                f"and plain HTTP answered GET /v2/ with {status}, not as a registry",
                hint=_timeout_hint(https_error),
            )
        log.info(
            "%s: insecure registry, HTTPS unreachable (%s); using plain HTTP",
            host,
            self._describe(https_error),
        )
        return "http"

    def _describe(self, exc: httpx.TransportError) -> str:
        """What went wrong; a connect timeout says so, and the setting's value."""
        if isinstance(exc, httpx.ConnectTimeout):
            # The setting's name, so a user on a slow link knows what to raise.
            return f"connect timed out after {self._config.connect_timeout:g} s (connect timeout)"
        return f"{type(exc).__name__}: {exc or 'no detail'}"

    def _ping(self, scheme: str, host: str) -> int:
        """The status of ``GET <scheme>://host/v2/``, unauthenticated; the body is not read."""
        timeout = httpx.Timeout(self._config.connect_timeout)
        request = self._http.build_request("GET", f"{scheme}://{host}/v2/", timeout=timeout)
        response = self._http.send(request, stream=True, follow_redirects=False)
        response.close()
        return response.status_code


def _https(host: str) -> str:
    log.info("%s: insecure registry, using HTTPS without certificate verification", host)
    return "https"


def _tls_failure(exc: BaseException) -> str | None:
    """Why the TLS handshake failed, if the TCP connection was made; else None."""
    current: BaseException | None = exc
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return getattr(current, "reason", None) or str(current)
        if isinstance(current, ConnectionResetError | BrokenPipeError):
            return "connection reset during the handshake"
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _timeout_hint(*errors: httpx.TransportError) -> str | None:
    """The CLI's advice when a connection timed out: the flag that waits longer."""
    if any(isinstance(e, httpx.ConnectTimeout) for e in errors):
        return "--connect-timeout S to wait longer"
    return None


__all__ = ["Schemes"]
