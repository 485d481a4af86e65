"""Resolve a reference to one platform's manifest and copy its blobs into the cache.

This is the "registry → blob store" edge of the pipeline. Resolution turns a
normalised reference into a resolved one (digest always present: the platform
manifest's). Blobs already in the cache are not fetched again; the others are
downloaded in parallel, each verified against its digest on the way in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .blobs import BlobStore
from .digest import Digest
from .errors import LayerError, LimitExceeded
from .reference import Reference
from . import registry
from .registry import RegistryClient
from .spec import (
    LAYER_COMPRESSION,
    MAX_DOCUMENT_BYTES,
    Descriptor,
    ImageConfig,
    Manifest,
    Platform,
    parse_config,
)

log = logging.getLogger(__name__)

DOWNLOAD_WORKERS = 4


@dataclass(frozen=True)
class ResolvedImage:
    """A reference pinned to one platform's manifest."""

    ref: Reference
    manifest: Manifest
    manifest_bytes: bytes
    media_type: str
    index_digest: Digest | None = None

    @property
    def digest(self) -> Digest:
        """The platform manifest's digest: what the store keys builds by."""
        assert self.ref.digest is not None
        return self.ref.digest


@dataclass(frozen=True)
class PulledImage:
    """A resolved image whose config and layers are all in the blob cache."""

    resolved: ResolvedImage
    config: ImageConfig
    config_bytes: bytes
    downloaded_bytes: int
    cached_blobs: int


class LayerProgress:
    """Callbacks a front end implements to show downloads; all optional no-ops here."""

    def start(self, digest: Digest, size: int, cached: bool) -> None:
        """A blob download begins (or is skipped because ``cached``)."""

    def advance(self, digest: Digest, nbytes: int) -> None:
        """``nbytes`` more of the blob arrived."""

    def done(self, digest: Digest) -> None:
        """The blob is verified and in the cache."""


def resolve(client: RegistryClient, ref: Reference, platform: Platform) -> ResolvedImage:
    """Fetch the manifest ``ref`` names; follow an index to ``platform``'s manifest."""
    found = registry.resolve(client, ref, platform)
    return ResolvedImage(
        ref.with_digest(found.fetched.digest),
        found.manifest,
        found.fetched.data,
        found.fetched.media_type,
        found.index.digest if found.index else None,
    )


def pull(
    client: RegistryClient,
    blobs: BlobStore,
    resolved: ResolvedImage,
    progress: LayerProgress | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> PulledImage:
    """Copy the config and every layer of ``resolved`` into ``blobs``; parse the config."""
    progress = progress or LayerProgress()
    manifest = resolved.manifest
    for layer in manifest.layers:
        if layer.media_type not in LAYER_COMPRESSION:
            raise LayerError(
                f"layer {layer.digest} has unsupported media type {layer.media_type!r}"
            )
    config_desc = manifest.config
    if config_desc.size > MAX_DOCUMENT_BYTES:
        # Refuse before downloading: the config is read whole into memory.
        raise LimitExceeded(
            f"the image config {config_desc.digest} is {config_desc.size} bytes by its "
            f"descriptor, over the {MAX_DOCUMENT_BYTES} byte limit"
        )
    if not blobs.has(config_desc.digest):
        with client.open_blob(resolved.ref, config_desc) as chunks:
            blobs.ingest(config_desc, chunks)
    config_bytes = blobs.read(config_desc.digest)
    config = parse_config(config_bytes)
    if len(config.diff_ids) != len(manifest.layers):
        raise LayerError(
            f"the image config lists {len(config.diff_ids)} diff_ids but the manifest has "
            f"{len(manifest.layers)} layers; the image is malformed"
        )

    downloaded = 0
    cached = 0

    def fetch(index: int) -> int:
        layer = manifest.layers[index]
        if blobs.has(layer.digest):
            progress.start(layer.digest, layer.size, cached=True)
            progress.done(layer.digest)
            return -1

        def advance(nbytes: int) -> None:
            progress.advance(layer.digest, nbytes)
            if on_bytes:
                on_bytes(nbytes)

        progress.start(layer.digest, layer.size, cached=False)
        with client.open_blob(resolved.ref, layer) as chunks:
            blobs.ingest(layer, chunks, on_chunk=advance)
        progress.done(layer.digest)
        return layer.size

    # Distinct layers only: an image may list the same blob twice.
    unique = list({layer.digest: i for i, layer in enumerate(manifest.layers)}.values())
    with ThreadPoolExecutor(max_workers=DOWNLOAD_WORKERS, thread_name_prefix="pull") as pool:
        for size in pool.map(fetch, sorted(unique)):
            if size < 0:
                cached += 1
            else:
                downloaded += size
    descriptor = _manifest_descriptor(resolved)
    blobs.put(descriptor, resolved.manifest_bytes)
    blobs.tag(descriptor, _ref_name(resolved.ref))
    return PulledImage(resolved, config, config_bytes, downloaded, cached)


def _manifest_descriptor(resolved: ResolvedImage) -> Descriptor:
    return Descriptor(resolved.media_type, resolved.digest, len(resolved.manifest_bytes))


def _ref_name(ref: Reference) -> str:
    """The name the blob cache's index.json records: ``name:tag``, else ``name@digest``."""
    return f"{ref.name}:{ref.tag}" if ref.tag else str(ref)
