"""Finding a disk artifact for an image and a recipe in a cache repository.

Lookup order (docs/disk-artifacts.md, "Finding"):

1. the per-recipe tag (:attr:`Recipe.tag`): one request, and the artifact's
   own name, which no other writer can take away: the exact recipe or
   nothing;
2. the subject's referrers, through the Referrers API or its tag-schema
   fallback (:func:`registry.referrers.list_referrers`), for any artifact
   whose recipe *matches*: exact ones first, then by digest, so that every
   host picks the same.

Everything read is checked before it is believed: the manifest against its
digest, its config against its descriptor, both against each other and the
subject asked for (:func:`fleet.artifact.check_artifact`). A referrers entry
is only a hint (anyone with push rights writes the fallback index): an entry
that fails a check is skipped with a warning, and only the best
:data:`MAX_CANDIDATES` are read. What the per-recipe tag holds must pass, or
the lookup fails: that tag is this format's own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from hypeman_images.errors import (
    DigestMismatch,
    DiskArtifactInvalid,
    LayerError,
    LimitExceeded,
    NotFound,
    UnsupportedManifest,
)
from hypeman_images.fleet.artifact import (
    ARTIFACT_TYPE,
    MATCH_ANNOTATION,
    RECIPE_ANNOTATION,
    DiskArtifact,
    check_artifact,
    parse_manifest,
)
from hypeman_images.fleet.config import DiskConfig
from hypeman_images.fleet.recipe import Recipe
from hypeman_images.oci.digest import Digest, VerifyingStream
from hypeman_images.oci.reference import Reference
from hypeman_images.oci.spec import OCI_MANIFEST, Descriptor
from hypeman_images.registry.client import RegistryClient
from hypeman_images.registry.referrers import list_referrers

log = logging.getLogger(__name__)

Via = Literal["tag", "api", "index"]

# Referrers read at most, best first: an index of 4 MiB can list ~20,000 entries
# that claim the recipe, and each costs two requests before the build may start.
MAX_CANDIDATES = 8
# What makes a referrer unfit, to be passed over: gone, or not a sound disk artifact
# (a document no parser takes is a LayerError, one too large a LimitExceeded).
_UNFIT = (
    NotFound, DiskArtifactInvalid, DigestMismatch, LayerError, LimitExceeded, UnsupportedManifest,
)  # fmt: skip


@dataclass(frozen=True)
class FoundDisk:
    """A checked disk artifact in ``repository``, how it was found, and whether it is exact.

    ``exact``: built by the very recipe asked for (the same bytes a local
    build would make); otherwise a matching recipe (another e2fsprogs release).
    ``via``: the per-recipe ``tag``, the referrers ``api``, or the fallback ``index``.
    """

    repository: Reference
    artifact: DiskArtifact
    exact: bool
    via: Via


def read_artifact(
    client: RegistryClient, repository: Reference, name: str | Digest, subject: Digest
) -> DiskArtifact:
    """The disk artifact ``name`` (a tag or a digest) of ``repository``, checked whole.

    Raises :class:`NotFound` if there is none, :class:`DiskArtifactInvalid` if
    it is not a disk artifact of ``subject`` or contradicts itself,
    :class:`DigestMismatch` if the registry's bytes do not match their names.
    """
    ref = repository.with_digest(name) if isinstance(name, Digest) else repository.with_tag(name)
    fetched = client.get_manifest(ref)
    if fetched.media_type != OCI_MANIFEST:
        raise DiskArtifactInvalid(f"{ref} is a {fetched.media_type}, not a disk artifact")
    manifest = parse_manifest(fetched.data, fetched.digest)
    config_data = _read_config(client, repository, manifest.config)
    return check_artifact(manifest, DiskConfig.parse(config_data), config_data, subject)


def find_disk(client: RegistryClient, repository: Reference, want: Recipe) -> FoundDisk | None:
    """The best artifact in ``repository`` for a disk of ``want``, or None.

    Registry failures (:class:`Unauthorized`, :class:`TransientError`, ...)
    raise: the caller decides whether to build locally instead.
    """
    try:
        artifact = read_artifact(client, repository, want.tag, want.source)
    except NotFound:
        pass
    else:
        if not artifact.config.recipe.exact(want):
            raise DiskArtifactInvalid(
                f"{repository.name}:{want.tag} holds disk artifact {artifact.digest} of another "
                "recipe than its tag names"
            )
        return FoundDisk(repository, artifact, True, "tag")
    listing = list_referrers(client, repository, want.source, ARTIFACT_TYPE)
    candidates = sorted(
        (e for e in listing.entries if e.annotations.get(MATCH_ANNOTATION) == want.match_key),
        key=lambda e: (e.annotations.get(RECIPE_ANNOTATION) != want.key, str(e.digest)),
    )
    if len(candidates) > MAX_CANDIDATES:
        log.warning(
            "%d referrers of %s claim a matching disk; trying the first %d only",
            len(candidates), want.source, MAX_CANDIDATES,
        )  # fmt: skip
    for entry in candidates[:MAX_CANDIDATES]:
        try:
            artifact = read_artifact(client, repository, entry.digest, want.source)
        except _UNFIT as exc:
            log.warning("skipping referrer %s of %s: %s", entry.digest, want.source, exc)
            continue
        recipe = artifact.config.recipe
        if recipe.matches(want):
            via: Via = "api" if listing.source == "api" else "index"
            return FoundDisk(repository, artifact, recipe.exact(want), via)
        log.warning("skipping referrer %s: its annotations do not tell its recipe", entry.digest)
    return None


def _read_config(client: RegistryClient, repository: Reference, blob: Descriptor) -> bytes:
    """The config blob, verified against its descriptor (whose size parse_manifest capped)."""
    with client.open_blob(repository, blob) as chunks:
        stream = VerifyingStream(chunks, blob.digest, blob.size)
        data = b"".join(stream)
    stream.verify()
    return data


__all__ = ["MAX_CANDIDATES", "FoundDisk", "Via", "find_disk", "read_artifact"]
