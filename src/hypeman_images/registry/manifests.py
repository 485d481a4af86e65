"""What resolving a name gives: manifests as fetched, and one platform's pick from an index.

:class:`~.client.RegistryClient` fetches (``get_manifest``) and
:func:`~.client.resolve` follows an index with :func:`select_manifest`.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypeman_images.oci.digest import Digest
from hypeman_images.oci.reference import Reference
from hypeman_images.oci.spec import Descriptor, Index, Manifest, Platform

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


def select_manifest(index: Index, platform: Platform) -> Descriptor:
    """The image manifest for ``platform``, skipping attestation and unknown entries."""
    usable = tuple(
        d
        for d in index.manifests
        if d.annotations.get(_REFERENCE_TYPE) != "attestation-manifest"
        and not (d.platform and d.platform.os == "unknown")
    )
    return Index(index.media_type, usable).select(platform)


__all__ = ["FetchedManifest", "Resolved", "select_manifest"]
