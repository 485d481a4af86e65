"""Manifests: fetching one safely, and resolving a reference to its platform's manifest.

:func:`fetch_manifest` (behind :meth:`RegistryClient.get_manifest`) GETs a
manifest or index by digest or tag from the first endpoint that has it
(:mod:`.endpoints`), all within one deadline; it reads the body through
:func:`read_document` (a size cap and the deadline) and checks it against its
digest (:func:`check_manifest_digest`; image-spec descriptor.md: the digest
is of the exact bytes). :func:`resolve_manifest` follows an index to one
platform's image manifest (image-spec image-index.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx

from hypeman_images.errors import (
    DigestMismatch,
    HypemanError,
    LimitExceeded,
    RegistryError,
    TransientError,
)
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.reference import Reference
from hypeman_images.oci.spec import (
    ACCEPT_MANIFESTS,
    Descriptor,
    Index,
    Manifest,
    Platform,
    media_type_of,
    parse_manifest_or_index,
)
from hypeman_images.oci.wire import decimal
from hypeman_images.registry.config import RegistryConfig
from hypeman_images.registry.endpoints import Endpoint, Send, first_success
from hypeman_images.registry.retry import retrying, translating
from hypeman_images.registry.schemes import Schemes

if TYPE_CHECKING:
    from hypeman_images.registry.client import RegistryClient

log = logging.getLogger(__name__)

# buildkit marks attestation manifests in an index this way (platform unknown/unknown).
_REFERENCE_TYPE = "vnd.docker.reference.type"


@dataclass(frozen=True)
class FetchedManifest:
    """A manifest or index exactly as the registry sent it, with its verified digest."""

    data: bytes
    media_type: str
    digest: Digest


@dataclass(frozen=True)
class Resolved:
    """A reference resolved over the network.

    ``reference`` carries the digest the name pointed to (the index's, for a
    multi-platform image); ``manifest``/``fetched`` are the chosen platform's
    image manifest, and ``index`` the index it came from, if any.
    """

    reference: Reference
    manifest: Manifest
    fetched: FetchedManifest
    index: FetchedManifest | None = None


def fetch_manifest(
    ref: Reference,
    deadline: float,
    *,
    endpoints: Sequence[Endpoint],
    send: Send,
    config: RegistryConfig,
    schemes: Schemes,
) -> FetchedManifest:
    """The manifest or index ``ref`` names, by digest if it has one, else by tag.

    From the first of ``endpoints`` that has it; ``send`` sends each GET, and
    a failed body read is translated as the client's requests are
    (:func:`.retry.translating`, with the client's ``schemes``). By digest, the
    bytes must hash to it; by tag, the digest is computed and must equal
    ``Docker-Content-Digest`` when the registry sends one. ``deadline``
    (``time.monotonic()``) bounds every attempt on every endpoint: past it, a
    ``TransientError`` that is not retried.
    """
    return first_success(
        endpoints,
        ref,
        lambda endpoint: _fetch_from(endpoint, ref, deadline, send, config, schemes),
    )


def _fetch_from(
    endpoint: Endpoint,
    ref: Reference,
    deadline: float,
    send: Send,
    config: RegistryConfig,
    schemes: Schemes,
) -> FetchedManifest:
    target = str(ref.digest) if ref.digest else ref.tag or "latest"
    subject = f"manifest {ref}"
    path = endpoint.path(ref.repository, f"manifests/{target}")
    headers = {"Accept": ", ".join(ACCEPT_MANIFESTS)}

    def expired() -> TransientError:
        return TransientError(
            f"{endpoint.host}: no whole answer for {subject} within the "
            f"{config.manifest_timeout:g} s manifest deadline "
            f"(--manifest-timeout S to wait longer)"
        )

    def fetch() -> tuple[bytes, str | None, str | None]:
        timeout = _within(deadline, config, expired)
        response = send(endpoint, ref, path, headers, subject, timeout=timeout)
        with translating(endpoint.host, subject, config, schemes):
            try:
                data = read_document(
                    response, subject, config.max_manifest_bytes, deadline, expired
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

    data, header_type, header_digest = retrying(attempt, config, deadline)
    digest = check_manifest_digest(data, ref, header_digest, endpoint)
    limit = config.max_manifest_bytes
    return FetchedManifest(data, media_type_of(data, header_type, limit), digest)


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


def read_document(
    response: httpx.Response,
    subject: str,
    limit: int,
    deadline: float,
    expired: Callable[[], TransientError],
) -> bytes:
    """The body of a manifest response, within ``limit`` bytes and by ``deadline``."""
    length = response.headers.get("Content-Length")
    declared = decimal(length) if length else None
    if declared is not None and declared > limit:
        raise LimitExceeded(
            f"{subject} is {length} bytes, over the {limit} byte limit for manifests"
        )
    data = bytearray()
    for chunk in response.iter_bytes():
        data += chunk
        if len(data) > limit:
            raise LimitExceeded(f"{subject} exceeds the {limit} byte limit for manifests")
        if time.monotonic() > deadline:
            raise expired()
    return bytes(data)


def check_manifest_digest(
    data: bytes, ref: Reference, header: str | None, endpoint: Endpoint
) -> Digest:
    """The manifest's digest: the one ``ref`` names, checked, or its own, checked against
    ``Docker-Content-Digest`` when the registry sends one."""
    if ref.digest is not None:
        actual = Digest.of(data, ref.digest.algorithm)
        if actual != ref.digest:
            raise DigestMismatch(
                f"{endpoint.host} sent a manifest for {ref} that hashes to {actual}"
            )
        return ref.digest
    digest = Digest.of(data)
    if header:
        try:
            claimed = Digest.parse(header.strip())
        except HypemanError:
            log.debug("%s: ignoring malformed Docker-Content-Digest %r", endpoint.host, header)
            return digest
        if Digest.of(data, claimed.algorithm) != claimed:
            raise DigestMismatch(
                f"{endpoint.host} sent a manifest for {ref} whose Docker-Content-Digest "
                f"{claimed} does not match its bytes"
            )
    return digest


def select_manifest(index: Index, platform: Platform) -> Descriptor:
    """The image manifest for ``platform``, skipping attestation and unknown entries."""
    usable = tuple(
        d
        for d in index.manifests
        if d.annotations.get(_REFERENCE_TYPE) != "attestation-manifest"
        and not (d.platform and d.platform.os == "unknown")
    )
    return Index(index.media_type, usable).select(platform)


def resolve_manifest(client: RegistryClient, ref: Reference, platform: Platform) -> Resolved:
    """Fetch ``ref``'s manifest; through an index, pick ``platform``'s.

    Both fetches share one deadline, ``config.manifest_timeout`` from now.

    Raises ``PlatformNotFound`` (listing what is offered) when the index lacks it,
    ``UnsupportedManifest`` for schema 1 and other unknown formats.
    """
    deadline = time.monotonic() + client.config.manifest_timeout
    top = client.get_manifest(ref, deadline)
    limit = client.config.max_manifest_bytes
    parsed = parse_manifest_or_index(top.data, top.media_type, limit)
    resolved = ref.with_digest(top.digest)
    if isinstance(parsed, Manifest):
        return Resolved(resolved, parsed, top)
    chosen = select_manifest(parsed, platform)
    fetched = client.get_manifest(ref.with_digest(chosen.digest), deadline)
    manifest = parse_manifest_or_index(fetched.data, fetched.media_type, limit)
    if not isinstance(manifest, Manifest):
        raise RegistryError(f"{ref}: the index entry for {platform} is itself an index")
    return Resolved(resolved, manifest, fetched, top)
