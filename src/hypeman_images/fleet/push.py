"""Pushing a built disk to a cache repository as an artifact attached to its image.

The order makes every state a reader can see a valid one (distribution-spec
1.1, "Push"): the chunks go up as they are compressed, each skipped if the
repository has it; then the config; then the manifest, by digest and by its
own per-recipe tag (:attr:`Recipe.tag`); last, unless the registry said it
indexed the subject itself (``OCI-Subject``), the entry in the subject's
referrers tag-schema index. A manifest never names a blob that is not there
yet, and the index never names a manifest that is not there yet.

The index update may lose a race with other writers that distribution 2.8
cannot arbitrate (no conditional PUT); the per-recipe tag is ours alone, so
the artifact stays findable for its exact recipe whatever happens to the
index (docs/disk-artifacts.md, "Finding").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from hypeman_images.errors import RegistryError
from hypeman_images.fleet.artifact import CHUNK_SIZE, DiskArtifact
from hypeman_images.fleet.config import CONFIG_TYPE, Runtime
from hypeman_images.fleet.pack import pack_disk
from hypeman_images.fleet.recipe import Recipe
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.reference import Reference
from hypeman_images.oci.spec import OCI_MANIFEST, Descriptor
from hypeman_images.registry.client import RegistryClient
from hypeman_images.registry.push import push_blob, put_manifest
from hypeman_images.registry.referrers import DEFAULT_SETTLE, add_referrer

log = logging.getLogger(__name__)

Indexed = Literal["api", "tag", "unconfirmed", "failed"]


@dataclass(frozen=True)
class PushedDisk:
    """A disk artifact in its cache repository.

    ``indexed`` says how its subject's referrers list it: ``api`` (the
    registry does it), ``tag`` (our entry in the fallback index, confirmed),
    ``unconfirmed`` (other writers kept overwriting the index) or ``failed``
    (the index could not be written: ``index_error`` says why). In every
    case ``tag`` finds the artifact for its exact recipe.
    """

    repository: Reference
    artifact: DiskArtifact
    tag: str
    uploaded: int  # blobs sent; the rest were already there
    indexed: Indexed
    index_error: str | None = None
    uploaded_bytes: int = 0  # the bytes of the blobs sent

    @property
    def digest(self) -> Digest:
        return self.artifact.digest


def push_disk(
    client: RegistryClient,
    repository: Reference,
    disk: Path,
    subject: Descriptor,
    recipe: Recipe,
    runtime: Runtime,
    *,
    expected_sha256: Digest | None = None,
    chunk_size: int = CHUNK_SIZE,
    parallel: int = 2,
    settle: float = DEFAULT_SETTLE,
) -> PushedDisk:
    """Push ``disk``, built from ``subject`` by ``recipe``, to ``repository``.

    ``repository``'s tag and digest are ignored: the artifact's names are its
    digest and :attr:`Recipe.tag`. ``expected_sha256`` is the sha256 recorded
    at build time (a disk that changed since is :class:`CorruptDisk`, and not
    pushed); ``parallel`` chunks are compressed and uploaded at once;
    ``settle`` is how long the fallback index must keep our entry
    (:func:`registry.referrers.add_referrer`). Raises the registry's errors
    (:class:`Unauthorized` without push rights, ...); the referrers index
    alone never fails the push.
    """
    uploads: list[int] = []  # the size of each blob sent (not of those already there)

    def upload(blob: Descriptor, data: bytes) -> None:
        if push_blob(client, repository, blob.digest, data):
            uploads.append(len(data))

    artifact = pack_disk(
        disk, subject, recipe, runtime, chunk_size=chunk_size, parallel=parallel,
        expected_sha256=expected_sha256, on_chunk=lambda chunk, data: upload(chunk.blob, data),
    )  # fmt: skip
    config = artifact.manifest.config
    assert config.media_type == CONFIG_TYPE
    upload(config, artifact.config_data)
    data = artifact.manifest.data
    pushed = put_manifest(client, repository, str(artifact.digest), data, OCI_MANIFEST)
    put_manifest(client, repository, recipe.tag, data, OCI_MANIFEST)
    log.info(
        "pushed disk artifact %s (%d chunks) to %s:%s",
        artifact.digest.short, len(artifact.chunks), repository.name, recipe.tag,
    )  # fmt: skip
    sent = len(uploads), sum(uploads)
    result = PushedDisk(repository, artifact, recipe.tag, sent[0], "api", uploaded_bytes=sent[1])
    if pushed.subject_indexed:
        return result
    try:
        stayed = add_referrer(
            client, repository, subject.digest, artifact.referrer(), settle=settle
        )
    except RegistryError as exc:
        log.warning("disk artifact %s is not in the referrers index: %s", artifact.digest, exc)
        return replace(result, indexed="failed", index_error=exc.message)
    return replace(result, indexed="tag" if stayed else "unconfirmed")


__all__ = ["PushedDisk", "push_disk"]
