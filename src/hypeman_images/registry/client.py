"""A client for the OCI Distribution API v2: manifests and blobs, pull only.

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

Every response body is under the low-speed limit (:mod:`.speed`), and
resolving a name under ``config.manifest_timeout`` (retries, mirrors and the
index included). Manifests are read with a size cap and checked against
their digest here;
blobs are streamed raw and the caller checks them (a ``VerifyingStream``),
while this module resumes a dropped download with ``Range`` so that the
caller sees every byte exactly once. Mirrors configured for a registry are
tried first, the registry itself last. Each host's scheme is decided by
:mod:`.schemes` on its first request (an insecure host is probed once).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

import httpx

from hypeman_images.errors import (
    HypemanError,
    NotFound,
    RegistryError,
    TransientError,
)
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.reference import Reference
from hypeman_images.oci.spec import (
    ACCEPT_MANIFESTS,
    Descriptor,
    media_type_of,
)
from hypeman_images.registry.auth import RegistryAuth, TokenCache, pull_scope
from hypeman_images.registry.config import RegistryConfig
from hypeman_images.registry.credentials import (
    BorrowedCredentials,
    CachedCredentials,
    Credential,
    CredentialSource,
    StaticCredentials,
)
from hypeman_images.registry.download import Download
from hypeman_images.registry.manifests import check_manifest_digest, read_document
from hypeman_images.registry.responses import error_for, log_rate_limit
from hypeman_images.registry.retry import retrying, translating
from hypeman_images.registry.schemes import Schemes
from hypeman_images.registry.speed import SpeedLimitedTransport
from hypeman_images.registry.transport import HostTransport

log = logging.getLogger(__name__)

T = TypeVar("T")
USER_AGENT = "hypeman-images/0.1"
# buildkit marks attestation manifests in an index this way (platform unknown/unknown).
_FOREIGN_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)


@dataclass(frozen=True)
class FetchedManifest:
    """A manifest or index exactly as the registry sent it, with its verified digest."""

    data: bytes
    media_type: str
    digest: Digest


@dataclass(frozen=True)
class Endpoint:
    """Where requests for a registry go: the registry itself or one of its mirrors.

    ``registry`` is the name credentials are looked up under; ``host`` the API
    host, whose scheme the client decides when it first sends there.
    """

    registry: str
    host: str
    mirror: bool = False

    def path(self, repository: str, rest: str) -> str:
        """The API path of ``rest`` (``manifests/<tag>``, ``blobs/<digest>``) in ``repository``."""
        return f"/v2/{repository}/{rest}"


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
        out = [
            Endpoint(m.location, m.location, mirror=True)
            for m in self.config.mirrors_for(ref.registry)
        ]
        out.append(Endpoint(ref.registry, ref.api_host))
        return out

    def _first_success(self, ref: Reference, fetch: Callable[[Endpoint], T]) -> T:
        endpoints = self.endpoints(ref)
        for endpoint in endpoints[:-1]:
            try:
                return fetch(endpoint)
            except NotFound as exc:
                # A mirror that lacks an image is normal (containerd logs "trying next
                # host - response was http.StatusNotFound" at info level too).
                log.info("mirror %s lacks it, trying the next: %s", endpoint.host, exc)
            except HypemanError as exc:
                log.warning("mirror %s failed for %s, trying the next: %s", endpoint.host, ref, exc)
        return fetch(endpoints[-1])

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

    # -- manifests -----------------------------------------------------------------

    def get_manifest(self, ref: Reference, deadline: float | None = None) -> FetchedManifest:
        """Fetch the manifest or index ``ref`` names, by digest if it has one, else by tag.

        By digest, the bytes must hash to it; by tag, the digest is computed and
        must equal ``Docker-Content-Digest`` when the registry sends one.
        ``deadline`` (``time.monotonic()``; default ``config.manifest_timeout``
        from now) bounds every attempt on every endpoint: past it, a
        ``TransientError`` that is not retried.
        """
        if deadline is None:
            deadline = time.monotonic() + self.config.manifest_timeout
        return self._first_success(
            ref, lambda endpoint: self._get_manifest(endpoint, ref, deadline)
        )

    def _get_manifest(self, endpoint: Endpoint, ref: Reference, deadline: float) -> FetchedManifest:
        target = str(ref.digest) if ref.digest else ref.tag or "latest"
        subject = f"manifest {ref}"
        path = endpoint.path(ref.repository, f"manifests/{target}")
        headers = {"Accept": ", ".join(ACCEPT_MANIFESTS)}

        def expired() -> TransientError:
            return TransientError(
                f"{endpoint.host}: no whole answer for {subject} within the "
                f"{self.config.manifest_timeout:g} s manifest deadline "
                f"(--manifest-timeout S to wait longer)"
            )

        def fetch() -> tuple[bytes, str | None, str | None]:
            timeout = _within(deadline, self.config, expired)
            response = self._send(endpoint, ref, path, headers, subject, timeout=timeout)
            with translating(endpoint.host, subject, self.config, self._schemes):
                try:
                    data = read_document(
                        response, subject, self.config.max_manifest_bytes, deadline, expired
                    )
                finally:
                    response.close()
            return (
                data,
                response.headers.get("Content-Type"),
                response.headers.get("Docker-Content-Digest"),
            )

        def attempt() -> tuple[bytes, str | None, str | None]:
            try:
                return fetch()
            except TransientError as exc:
                # A timeout cut short to fit the deadline: the deadline is the cause.
                if time.monotonic() < deadline:
                    raise
                raise expired() from exc

        data, header_type, header_digest = retrying(attempt, self.config, deadline)
        digest = check_manifest_digest(data, ref, header_digest, endpoint)
        limit = self.config.max_manifest_bytes
        return FetchedManifest(data, media_type_of(data, header_type, limit), digest)

    # -- blobs ---------------------------------------------------------------------

    @contextmanager
    def open_blob(self, ref: Reference, descriptor: Descriptor) -> Iterator[Iterator[bytes]]:
        """Stream the raw bytes of a blob of ``ref``'s repository, in chunks of ≥ 1 MiB.

        Unverified: wrap the chunks in a ``VerifyingStream``. A connection that
        drops mid-way is resumed with ``Range`` (``config.resume_attempts`` times).
        Foreign layers come from their ``urls`` only if ``allow_foreign_layers``.
        """
        subject = f"blob {descriptor.digest} of {ref.name}"
        download: Download | None = None
        if self.config.allow_foreign_layers and descriptor.media_type in _FOREIGN_TYPES:
            download = self._open_foreign(descriptor, subject)
        if download is None:
            download = self._first_success(
                ref, lambda endpoint: self._open_blob(endpoint, ref, descriptor, subject)
            )
        try:
            yield download.chunks()
        finally:
            download.close()

    def _open_blob(
        self, endpoint: Endpoint, ref: Reference, descriptor: Descriptor, subject: str
    ) -> Download:
        path = endpoint.path(ref.repository, f"blobs/{descriptor.digest}")
        opener = self._ranged_opener(endpoint, ref, path, subject)
        try:
            return Download(opener, descriptor.size, self.config, subject)
        except NotFound as exc:
            if descriptor.media_type in _FOREIGN_TYPES and descriptor.urls:
                raise NotFound(
                    f"{exc.detail}; it is a foreign (non-distributable) layer, which its image "
                    f"says to fetch from {descriptor.urls[0]}",
                    hint="allow that with --allow-foreign-layers "
                    "(allow-foreign-layers = true in registries.conf)",
                    api_hint="the server's registries.conf can allow that "
                    "(allow-foreign-layers = true)",
                ) from exc
            raise

    def _ranged_opener(
        self, endpoint: Endpoint, ref: Reference | None, url: str, subject: str
    ) -> Callable[[int], httpx.Response]:
        """A function that (re)opens ``url`` (or API path) from a byte offset, for resuming."""

        def opener(offset: int) -> httpx.Response:
            # Identity encoding: the digest covers the bytes as stored, not a re-encoding.
            headers = {"Accept-Encoding": "identity"}
            if offset:
                headers["Range"] = f"bytes={offset}-"
            return retrying(lambda: self._send(endpoint, ref, url, headers, subject), self.config)

        return opener

    def _open_foreign(self, descriptor: Descriptor, subject: str) -> Download | None:
        for url in descriptor.urls:
            parsed = httpx.URL(url)
            if parsed.scheme not in ("http", "https"):
                continue
            host = parsed.netloc.decode("ascii")
            endpoint = Endpoint(host, host)
            opener = self._ranged_opener(endpoint, None, url, subject)
            try:
                return Download(opener, descriptor.size, self.config, subject)
            except HypemanError as exc:
                log.warning("foreign layer URL %s failed: %s", url, exc)
        return None

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
            full = url
            if url.startswith("/"):
                full = f"{self._schemes.scheme(endpoint.host)}://{endpoint.host}{url}"
            request = self._http.build_request(method, full, headers=headers, content=content)
            with translating(endpoint.host, subject, self.config, self._schemes):
                response = self._http.send(request, auth=auth, stream=True)
            if response.is_success or response.status_code in expect:
                return response
            if response.status_code in (401, 403):
                response.close()
                raise auth.refused()
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
        if url.startswith("/"):
            try:
                scheme = self._schemes.scheme(endpoint.host)
            except TransientError as exc:
                raise TransientError(
                    f"{exc.detail} while fetching {subject}", hint=exc.hint, api_hint=exc.api_hint
                ) from exc
            url = f"{scheme}://{endpoint.host}{url}"
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

    def _send_token_request(self, request: httpx.Request) -> httpx.Response:
        # Transport errors propagate to _send's translation, as part of that request.
        return self._http.send(request, stream=True)


def _within(
    deadline: float, config: RegistryConfig, expired: Callable[[], TransientError]
) -> httpx.Timeout:
    """The timeouts of one request that must end by ``deadline``; ``expired()`` if it has passed."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise expired()
    return httpx.Timeout(
        min(config.read_timeout, remaining), connect=min(config.connect_timeout, remaining)
    )


__all__ = [
    "Endpoint",
    "FetchedManifest",
    "RegistryClient",
]
