"""Writing to a registry: blobs and manifests (distribution-spec 1.1, "Push").

Every write goes through :meth:`RegistryClient.request` with the
``repository:<name>:pull,push`` scope, so it shares the client's connection
pool, credentials, token cache and error translation. A blob is pushed only
if ``HEAD`` does not find it (spec "Checking if content exists"), as a
monolithic upload: ``POST /v2/<name>/blobs/uploads/`` opens a session, and one
``PUT <location>&digest=<digest>`` carries the whole body and closes it
("POST then PUT"; the single-POST form is optional for registries, and
distribution 2.8 answers it with a session like the plain POST). A manifest
is ``PUT`` by digest or tag with its exact bytes; a registry that processed
its ``subject`` (one with the Referrers API) says so with ``OCI-Subject``
("Pushing Manifests with Subject"), and the caller then has no referrers
index of its own to maintain.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import httpx

from hypeman_images.errors import DigestMismatch, HypemanError, RegistryError
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.reference import Reference
from hypeman_images.registry.auth import push_scope
from hypeman_images.registry.client import RegistryClient
from hypeman_images.registry.responses import named_url

log = logging.getLogger(__name__)

OCTET_STREAM = "application/octet-stream"
# Error codes (distribution-spec "Error Codes") of a manifest whose blobs the
# registry could not find: after a race with another writer, worth another PUT
# (retried as the client retries a 5xx).
_BLOB_UNKNOWN = frozenset({"MANIFEST_BLOB_UNKNOWN", "BLOB_UNKNOWN"})


@dataclass(frozen=True)
class PushedManifest:
    """A manifest the registry accepted: its digest, and whether it indexed the subject.

    ``subject_indexed`` is true when the registry answered ``OCI-Subject``: it
    serves the Referrers API and lists this manifest there by itself.
    """

    digest: Digest
    subject_indexed: bool


def blob_exists(client: RegistryClient, repo: Reference, digest: Digest) -> bool:
    """``HEAD /v2/<name>/blobs/<digest>``: is the blob in ``repo`` already?"""
    response = client.request(
        "HEAD",
        repo,
        f"/v2/{repo.repository}/blobs/{digest}",
        scope=push_scope(repo.repository),
        subject=f"blob {digest} of {repo.name}",
        expect=(404,),
    )
    response.close()
    return response.status_code != 404


def push_blob(client: RegistryClient, repo: Reference, digest: Digest, data: bytes) -> bool:
    """Upload ``data`` as blob ``digest`` of ``repo`` unless it is there; True if uploaded.

    The digest is checked here first: a registry would refuse a wrong one
    (``DIGEST_INVALID``) only after the whole body went up.
    """
    if Digest.of(data, digest.algorithm) != digest:
        raise DigestMismatch(f"refusing to push {len(data)} bytes as {digest}: they hash otherwise")
    if blob_exists(client, repo, digest):
        log.debug("%s: blob %s already there", repo.name, digest.short)
        return False
    scope = push_scope(repo.repository)
    subject = f"an upload of blob {digest} to {repo.name}"
    started = client.request(
        "POST", repo, f"/v2/{repo.repository}/blobs/uploads/", scope=scope, subject=subject
    )
    started.close()
    location = started.headers.get("Location")
    if not location:
        raise RegistryError(
            f"{repo.registry} opened an upload to {repo.name} without a Location", 202
        )
    opened = named_url(location, f"the Location of {repo.registry}'s upload")
    target = str(opened.copy_merge_params({"digest": str(digest)}))
    headers = {"Content-Type": OCTET_STREAM}
    done = client.request(
        "PUT", repo, target, scope=scope, subject=subject, headers=headers, content=data
    )
    done.close()
    _check_digest_header(done, digest, repo, f"blob {digest}")
    return True


def put_manifest(
    client: RegistryClient, repo: Reference, reference: str, data: bytes, media_type: str
) -> PushedManifest:
    """``PUT /v2/<name>/manifests/<reference>`` (a tag or ``str(digest)``) with ``data``.

    The registry stores these exact bytes; the digest it reports
    (``Docker-Content-Digest``), when it reports one, must be theirs.
    """
    digest = Digest.of(data)
    response = client.request(
        "PUT",
        repo,
        f"/v2/{repo.repository}/manifests/{reference}",
        scope=push_scope(repo.repository),
        subject=f"manifest {repo.name}:{reference}",
        headers={"Content-Type": media_type},
        content=data,
        # distribution 2.8 rewrites a blob's repository link in place when
        # another client commits the same blob: a manifest checked in that
        # instant meets an empty link and is refused as naming an unknown blob
        # (tests/system/test_fleet.py, two hosts pushing one disk).
        retry_codes=_BLOB_UNKNOWN,
    )
    response.close()
    _check_digest_header(response, digest, repo, f"manifest {reference}")
    indexed = response.headers.get("OCI-Subject")
    return PushedManifest(digest, bool(indexed))


def _check_digest_header(
    response: httpx.Response, expected: Digest, repo: Reference, what: str
) -> None:
    header = response.headers.get("Docker-Content-Digest")
    if not header:
        return
    try:
        said = Digest.parse(header.strip())
    except HypemanError:
        log.debug("%s: ignoring malformed Docker-Content-Digest %r", repo.registry, header)
        return
    if said != expected:
        raise DigestMismatch(
            f"{repo.registry} stored {what} of {repo.name} as {said}, not as {expected}"
        )


__all__ = ["OCTET_STREAM", "PushedManifest", "blob_exists", "push_blob", "put_manifest"]
