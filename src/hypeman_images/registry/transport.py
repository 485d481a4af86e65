"""The HTTP transport: one connection pool per host, each with its own TLS trust.

docker trusts a registry's private CA when ``<certs.d>/<host:port>/ca.crt``
exists, and presents ``client.cert``/``client.key`` from the same directory;
a single ``httpx.HTTPTransport`` has one SSL context, so this routes each
request to a transport built for its host. An insecure host's certificate is
not verified (docker's ``insecure-registries``, registries.conf's ``insecure =
true``); whether it gets HTTPS at all is :mod:`.schemes`' decision. Tests
replace the whole thing by passing their own ``httpx.BaseTransport`` to the client.
"""

from __future__ import annotations

import logging
import ssl
import threading
import urllib.request
from pathlib import Path

import httpx

from hypeman_images.errors import InvalidArgument
from hypeman_images.registry.config import RegistryConfig

log = logging.getLogger(__name__)


class HostTransport(httpx.BaseTransport):
    """Dispatch requests to a per-host ``HTTPTransport`` with that host's TLS settings."""

    def __init__(self, config: RegistryConfig) -> None:
        self._config = config
        self._transports: dict[str, httpx.HTTPTransport] = {}
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self._for(request.url).handle_request(request)

    def close(self) -> None:
        with self._lock:
            transports, self._transports = list(self._transports.values()), {}
        for transport in transports:
            transport.close()

    def _for(self, url: httpx.URL) -> httpx.HTTPTransport:
        host = url.netloc.decode("ascii")
        key = f"{url.scheme}://{host}"
        with self._lock:
            transport = self._transports.get(key)
            if transport is None:
                proxy = _proxy_for(url)
                if url.scheme == "https" and not self._config.verifies_tls(host):
                    log.debug("%s: insecure registry, its TLS certificate is not verified", host)
                transport = httpx.HTTPTransport(
                    verify=self._ssl_context(host), proxy=proxy, retries=0
                )
                self._transports[key] = transport
            return transport

    def _ssl_context(self, host: str) -> ssl.SSLContext:
        if not self._config.verifies_tls(host):
            # create_default_context() would load the system's CAs, which nobody checks
            # here, on every loopback pull's probe; this context has its defaults otherwise.
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        context = ssl.create_default_context()
        if self._config.ca_bundle is not None:
            _load_ca(context, self._config.ca_bundle)
        certs = self._config.certs_dir_for(host)
        if certs is not None:
            for ca in sorted(certs.glob("*.crt")):
                _load_ca(context, ca)
            for cert in sorted(certs.glob("*.cert")):
                key = cert.with_suffix(".key")
                try:
                    context.load_cert_chain(cert, key)
                except (OSError, ssl.SSLError) as exc:
                    raise InvalidArgument(f"cannot load client certificate {cert}: {exc}") from exc
        return context


def _load_ca(context: ssl.SSLContext, path: Path) -> None:
    try:
        context.load_verify_locations(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidArgument(f"cannot load CA certificates from {path}: {exc}") from exc


def _proxy_for(url: httpx.URL) -> str | None:
    """The proxy ``$https_proxy``/``$http_proxy`` name for this URL, honouring ``$no_proxy``."""
    host = url.host
    if host == "localhost" or host.startswith("127.") or host == "::1":
        return None
    if urllib.request.proxy_bypass(host):
        return None
    return urllib.request.getproxies().get(url.scheme)
