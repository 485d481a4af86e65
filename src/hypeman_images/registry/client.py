"""A client for the OCI Distribution API v2: every request, its auth and its errors.

``RegistryClient`` speaks HTTP through one ``httpx.Client`` (the transport is
the seam tests swap), authenticates through :mod:`.auth`, and turns every
failure into the exception tree at this boundary:

* 404 and ``MANIFEST_UNKNOWN``/``NAME_UNKNOWN``/``BLOB_UNKNOWN`` → ``NotFound``;
* 401/403 → ``Unauthorized`` naming the registry and the credential's origin;
* 429 → ``RateLimited`` at once, never retried;
* 5xx, timeouts and dropped connections → ``TransientError``, retried up to
  ``config.max_attempts`` times with exponential backoff and full jitter
  (:mod:`.retry`, which also translates httpx's exceptions);
* other 4xx → ``RegistryError(status, codes)`` with the registry's messages.

Every response body is under the low-speed limit (:mod:`.speed`). Each
host's scheme is decided by :mod:`.schemes` on its first request (an insecure
host is probed once). What a pull reads is read in its own module, handed
this client's one GET (:class:`.endpoints.Send`) and the registry's
endpoints, its mirrors first and itself last (:mod:`.endpoints`):
:mod:`.manifests` reads a manifest for :meth:`RegistryClient.get_manifest`
(size-capped, checked against its digest, within ``config.manifest_timeout``),
and :mod:`.download` streams a blob raw for :meth:`RegistryClient.open_blob`
(resumed with ``Range``; the caller checks it). Writes go through
:meth:`RegistryClient.request` (:mod:`.push`, :mod:`.referrers`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from types import TracebackType

import httpx

from hypeman_images.errors import RegistryError, TransientError, Unauthorized
from hypeman_images.oci.reference import Reference
from hypeman_images.oci.spec import Descriptor
from hypeman_images.registry.auth import RegistryAuth, TokenCache, pull_scope, same_origin
from hypeman_images.registry.config import RegistryConfig
from hypeman_images.registry.credentials import (
    BorrowedCredentials,
    CachedCredentials,
    Credential,
    CredentialSource,
    StaticCredentials,
)
from hypeman_images.registry.download import open_download
from hypeman_images.registry.endpoints import Endpoint, endpoints_for
from hypeman_images.registry.manifests import FetchedManifest, fetch_manifest
from hypeman_images.registry.responses import error_for, log_rate_limit
from hypeman_images.registry.retry import retrying, translating
from hypeman_images.registry.schemes import Schemes
from hypeman_images.registry.speed import SpeedLimitedTransport
from hypeman_images.registry.transport import HostTransport

USER_AGENT = "hypeman-images/0.1"


class RegistryClient:
    """Pull manifests and blobs from Distribution API v2 registries. Thread-safe.

    ``transport`` replaces the network (an ``httpx.MockTransport`` in tests);
    without it, a per-host transport applies ``config``'s TLS settings.
    """

    def __init__(
        self,
        *,
        credentials: CredentialSource | None = None,
        transport: httpx.BaseTransport | None = None,
        config: RegistryConfig | None = None,
    ) -> None:
        self.config = config or RegistryConfig()
        # Looked up once per (registry, repository) for the client's life, not per request.
        self._credentials: CredentialSource | None = (
            CachedCredentials(credentials) if credentials else None
        )
        self._borrowed: BorrowedCredentials | None = None
        self._owns_connections = True
        self._tokens = TokenCache()
        timeout = httpx.Timeout(self.config.read_timeout, connect=self.config.connect_timeout)
        self._http = httpx.Client(
            transport=SpeedLimitedTransport(
                transport or HostTransport(self.config),
                self.config.low_speed_limit,
                self.config.low_speed_time,
            ),
            timeout=timeout,
            follow_redirects=True,
            headers={"User-Agent": USER_AGENT},
        )
        self._schemes = Schemes(self.config, self._http)

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close every connection (a :meth:`borrowing` view leaves them to its parent)."""
        if self._owns_connections:
            self._http.close()

    def borrowing(self, registry: str, credential: Credential) -> RegistryClient:
        """This client for one request's ``credential`` to ``registry``, and for nothing else.

        The view shares the connections and the scheme decisions, and has its
        own token cache: a token got with ``credential`` is never sent for
        another request, nor one got with the server's credentials for this
        one. Other registries (a foreign layer's host, a mirror) still get the
        server's own credentials. Drop it when the build ends; nothing keeps it.
        """
        view = copy.copy(self)
        view._borrowed = BorrowedCredentials(registry, credential, fallback=self._credentials)
        view._credentials = view._borrowed
        view._tokens = TokenCache()
        view._owns_connections = False
        return view

    def _registry_token(self, registry: str) -> str:
        """The bearer token a borrowed credential gives for ``registry`` ("" for none)."""
        if self._borrowed is None:
            return ""
        credential = self._borrowed.get(registry)
        return credential.registry_token if credential is not None else ""

    # -- endpoints -----------------------------------------------------------------

    def endpoints(self, ref: Reference) -> list[Endpoint]:
        """The mirrors configured for ``ref``'s registry, then the registry itself."""
        return endpoints_for(self.config, ref)

    def check_login(self, registry: str, credential: Credential) -> None:
        """Check ``credential`` against ``registry`` as ``docker login`` does (``GET /v2/``).

        Returns quietly if accepted; raises ``Unauthorized`` (naming the registry,
        never the secret) if refused, or the usual errors if the registry fails.
        """
        ref = Reference(registry, "_")  # only for the API host of docker.io
        endpoint = Endpoint(registry, ref.api_host)
        auth = RegistryAuth(
            registry=registry,
            scope="",  # docker login asks for a token without a scope
            credentials=StaticCredentials({registry: credential}),
            cache=TokenCache(),
            send=self._send_token_request,
        )

        def attempt() -> None:
            self._send(endpoint, None, "/v2/", {}, "the API version check", auth=auth).close()

        retrying(attempt, self.config)

    # -- what a pull reads -----------------------------------------------------------

    def get_manifest(self, ref: Reference, deadline: float | None = None) -> FetchedManifest:
        """Fetch the manifest or index ``ref`` names, by digest if it has one, else by tag.

        By digest, the bytes must hash to it; by tag, the digest is computed and
        must equal ``Docker-Content-Digest`` when the registry sends one.
        ``deadline`` (``time.monotonic()``; default ``config.manifest_timeout``
        from now) bounds every attempt on every endpoint: past it, a
        ``TransientError`` that is not retried. See :func:`.manifests.fetch_manifest`.
        """
        if deadline is None:
            deadline = time.monotonic() + self.config.manifest_timeout
        return fetch_manifest(
            ref,
            deadline,
            endpoints=self.endpoints(ref),
            send=self._send,
            config=self.config,
            schemes=self._schemes,
        )

    @contextmanager
    def open_blob(self, ref: Reference, descriptor: Descriptor) -> Iterator[Iterator[bytes]]:
        """Stream the raw bytes of a blob of ``ref``'s repository, in chunks of ≥ 1 MiB.

        Unverified: wrap the chunks in a ``VerifyingStream``. A connection that
        drops mid-way is resumed with ``Range`` (``config.resume_attempts`` times).
        Foreign layers come from their ``urls`` only if ``allow_foreign_layers``.
        See :func:`.download.open_download`.
        """
        download = open_download(
            ref, descriptor, endpoints=self.endpoints(ref), send=self._send, config=self.config
        )
        try:
            yield download.chunks()
        finally:
            download.close()

    # -- one request ---------------------------------------------------------------

    def request(
        self,
        method: str,
        ref: Reference,
        url: str,
        *,
        scope: str,
        subject: str,
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
        expect: Collection[int] = (),
        retry_codes: Collection[str] = (),
    ) -> httpx.Response:
        """One request to ``ref``'s registry itself (never a mirror), authorised for ``scope``.

        For callers that write (:mod:`.push`, :mod:`.referrers`): ``url`` is an
        API path or an absolute URL the registry handed out (an upload's
        ``Location``). A 2xx answer, or one whose status is in ``expect``, is
        returned open (the caller closes it); anything else raises as every
        request of this client does, transient failures retried (``content`` is
        bytes, so a retry sends it whole again). An answer carrying one of
        ``retry_codes`` (distribution-spec error codes) is retried as a
        transient failure too: for this request it can be a race, not a verdict.
        """
        endpoint = Endpoint(ref.registry, ref.api_host)
        auth = RegistryAuth(
            registry=endpoint.registry,
            scope=scope,
            credentials=self._credentials,
            repository=ref.repository,
            cache=self._tokens,
            send=self._send_token_request,
        )

        def attempt() -> httpx.Response:
            full, sent = self._aim(endpoint, url, auth)
            assert sent is not None
            request = self._http.build_request(method, full, headers=headers, content=content)
            with translating(endpoint.host, subject, self.config, self._schemes):
                response = self._http.send(request, auth=sent, stream=True)
            if response.is_success or response.status_code in expect:
                return response
            if response.status_code in (401, 403):
                response.close()
                raise sent.refused() if sent is auth else _refused_elsewhere(endpoint, full)
            error = error_for(response, host=endpoint.registry, subject=subject)
            if isinstance(error, RegistryError) and set(retry_codes) & set(error.codes):
                raise TransientError(error.detail, error.status, error.codes) from error
            raise error

        return retrying(attempt, self.config)

    def _send(
        self,
        endpoint: Endpoint,
        ref: Reference | None,
        url: str,
        headers: dict[str, str],
        subject: str,
        *,
        auth: RegistryAuth | None = None,
        timeout: httpx.Timeout | None = None,
    ) -> httpx.Response:
        """One GET, auth included; a 2xx response (open, streaming) or an error.

        ``url`` is absolute (a foreign layer's) or an API path on the endpoint's
        host, whose scheme is decided here (an insecure host's first request
        probes it). Without ``ref`` and ``auth``, no credentials are sent.
        """
        if auth is None and ref is not None:
            auth = RegistryAuth(
                registry=endpoint.registry,
                scope=pull_scope(ref.repository),
                credentials=self._credentials,
                repository=ref.repository,
                cache=self._tokens,
                send=self._send_token_request,
                registry_token=self._registry_token(endpoint.registry),
            )
        try:
            url, auth = self._aim(endpoint, url, auth)
        except TransientError as exc:
            raise TransientError(
                f"{exc.detail} while fetching {subject}", hint=exc.hint, api_hint=exc.api_hint
            ) from exc
        request = self._http.build_request(
            "GET", url, headers=headers, timeout=timeout or httpx.USE_CLIENT_DEFAULT
        )
        with translating(endpoint.host, subject, self.config, self._schemes):
            response = self._http.send(request, auth=auth or httpx.USE_CLIENT_DEFAULT, stream=True)
        log_rate_limit(response, endpoint.host)
        if response.is_success:
            return response
        if response.status_code in (401, 403) and auth is not None:
            response.close()
            raise auth.refused()
        raise error_for(response, host=endpoint.registry, subject=subject)

    def _aim(
        self, endpoint: Endpoint, url: str, auth: RegistryAuth | None
    ) -> tuple[str, RegistryAuth | None]:
        """``url`` made absolute on ``endpoint``'s host (its scheme decided, an insecure
        host probed), and the auth it may carry: ``auth`` on the registry's own origin,
        its anonymous twin on another one (docs/security.md, "Credentials and redirects")."""
        if auth is None and not url.startswith("/"):
            return url, None  # a foreign layer's URL: no scheme to decide, nothing to withhold
        home = f"{self._schemes.scheme(endpoint.host)}://{endpoint.host}"
        if url.startswith("/"):
            return home + url, auth
        assert auth is not None
        return url, auth if same_origin(url, home) else auth.anonymous()

    def _send_token_request(self, request: httpx.Request) -> httpx.Response:
        # Transport errors propagate to _send's translation, as part of that request.
        return self._http.send(request, stream=True)


def _refused_elsewhere(endpoint: Endpoint, url: str) -> Unauthorized:
    """A 401/403 from a URL the registry handed out on another origin, asked anonymously."""
    where = httpx.URL(url)
    return Unauthorized(
        f"{endpoint.registry} sent this request to {where.scheme}://{where.netloc.decode()}, "
        f"which refused it; the credentials of {endpoint.registry} go to {endpoint.host} only",
        hint="the registry named that URL in a Location or Link header; check its configuration",
    )


# Endpoint and FetchedManifest live in .endpoints and .manifests; they are named
# here too for callers that import them with the client.
__all__ = [
    "Endpoint",
    "FetchedManifest",
    "RegistryClient",
]
