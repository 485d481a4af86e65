"""Manifests: reading one safely, and resolving a reference to its platform's manifest.

:meth:`RegistryClient.get_manifest` reads a manifest's body through
:func:`read_document` (a size cap and a deadline) and checks it against its
digest (:func:`check_manifest_digest`; image-spec descriptor.md: the digest
is of the exact bytes). :func:`resolve_manifest` follows an index to one
platform's image manifest (image-spec image-index.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
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
from hypeman_images.oci.spec import Descriptor, Index, Manifest, Platform, parse_manifest_or_index

if TYPE_CHECKING:
    from hypeman_images.registry.client import Endpoint, FetchedManifest, RegistryClient

log = logging.getLogger(__name__)

_REFERENCE_TYPE = "vnd.docker.reference.type"


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


def read_document(
    response: httpx.Response,
    subject: str,
    limit: int,
    deadline: float,
    expired: Callable[[], TransientError],
) -> bytes:
    """The body of a manifest response, within ``limit`` bytes and by ``deadline``."""
    length = response.headers.get("Content-Length")
    if length and length.isdigit() and int(length) > limit:
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
