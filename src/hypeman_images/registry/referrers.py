"""The referrers of a manifest: the Referrers API, and the tag-schema fallback kept by clients.

distribution-spec 1.1, "Listing Referrers": ``GET /v2/<name>/referrers/<digest>``
answers an OCI image index of the manifests whose ``subject`` is ``<digest>``,
optionally filtered by ``?artifactType=``; a registry that serves the API
never answers it 404. Where it is missing ("Unavailable Referrers API"),
clients keep that index themselves under the tag ``<alg>-<hex>`` of the
subject digest ("Referrers Tag Schema") and update it on every push of a
manifest with a ``subject`` ("Pushing Manifests with Subject"): read it (404:
start empty; anything but an index: report, change nothing), append the new
descriptor unless present, push it back.

That read-modify-write races with other clients, and the spec leaves the
protection to them (conditional PUT where a registry offers ETags;
distribution 2.8 does not). :func:`add_referrer` therefore re-reads the tag
after writing and again once ``settle`` seconds have passed since its last
write, and writes again (jittered, bounded) whenever its entry went missing:
another writer that read the index before our write lands its own within
its read-to-write window, so an entry still present after ``settle`` longer
than that window survived every such writer. Entries it read are never
dropped, fields it does not know are kept as they were, and an index it
cannot parse is never overwritten. Callers that cannot afford to lose an
entry in the window nobody can close keep a tag of their own besides
(docs/disk-artifacts.md, "Finding").
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from hypeman_images.errors import (
    HypemanError,
    LimitExceeded,
    NotFound,
    RegistryError,
    TransientError,
)
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.reference import Reference
from hypeman_images.oci.spec import OCI_INDEX, OCI_MANIFEST
from hypeman_images.oci.wire import load_json
from hypeman_images.registry.auth import pull_scope, push_scope
from hypeman_images.registry.client import RegistryClient
from hypeman_images.registry.push import put_manifest
from hypeman_images.registry.responses import named_url

log = logging.getLogger(__name__)

# Statuses of a registry without the Referrers API: 404 is the spec's signal;
# some answer an unknown route 400, 405 or 406, as go-containerregistry also accepts.
_NO_API = (400, 404, 405, 406)
_MAX_PAGES = 16  # Link rel="next" pages of one listing; a longer chain is refused
# What a refusal adds where it stops a rewrite of the index (strict), not a mere read.
_NOT_WRITING = {True: "; not writing over it", False: ""}
DEFAULT_SETTLE = 1.0
DEFAULT_ATTEMPTS = 8
_BACKOFF_BASE = 0.05
_BACKOFF_MAX = 1.0

Source = Literal["api", "tag"]


@dataclass(frozen=True)
class Referrer:
    """One descriptor of a referrers index: a manifest whose ``subject`` is the digest asked."""

    media_type: str
    digest: Digest
    size: int
    artifact_type: str = ""
    annotations: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The descriptor as the index carries it."""
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": str(self.digest),
            "size": self.size,
        }
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


@dataclass(frozen=True)
class Referrers:
    """What a listing found, and where: the registry's API or the fallback tag."""

    entries: tuple[Referrer, ...]
    source: Source


def fallback_tag(subject: Digest) -> str:
    """The referrers tag schema's tag for ``subject``: ``<alg>-<hex>`` (hex cut at 64)."""
    return f"{subject.algorithm}-{subject.encoded[:64]}"


def list_referrers(
    client: RegistryClient, repo: Reference, subject: Digest, artifact_type: str = ""
) -> Referrers:
    """The referrers of ``subject`` in ``repo``, through the API, else the fallback tag.

    Only entries of ``artifact_type`` (if given) come back, whether or not the
    registry applied the filter; malformed entries are skipped (anyone may
    write the fallback index). No fallback index at all lists nothing.
    """
    found = _from_api(client, repo, subject, artifact_type)
    source: Source = "api"
    if found is None:
        source = "tag"
        doc = _read_index(client, repo, fallback_tag(subject), strict=False)
        found = [] if doc is None else doc["manifests"]
    entries = tuple(
        entry
        for raw in found
        if (entry := _referrer(raw)) is not None
        and (not artifact_type or entry.artifact_type == artifact_type)
    )
    return Referrers(entries, source)


def add_referrer(
    client: RegistryClient,
    repo: Reference,
    subject: Digest,
    entry: Referrer,
    *,
    settle: float = DEFAULT_SETTLE,
    attempts: int = DEFAULT_ATTEMPTS,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Add ``entry`` to the fallback referrers index of ``subject``; True once it stayed.

    False if the entry kept disappearing for ``attempts`` reads (other writers
    raced every rewrite): the manifest itself is pushed, only this index lacks
    it. Raises :class:`RegistryError` if the tag holds something other than a
    well-formed index, which is left as it is.
    """
    tag = fallback_tag(subject)
    wrote_at: float | None = None
    for attempt in range(1, attempts + 1):
        backoff = min(_BACKOFF_MAX, _BACKOFF_BASE * 2 ** (attempt - 1))
        try:
            doc = _read_index(client, repo, tag, strict=True)
        except TransientError as exc:
            # distribution 2.8 rewrites a tag's link file in place: a read racing
            # another writer's PUT can meet it empty and answer 500. Nothing was
            # read, so nothing is written; read again.
            if attempt == attempts:
                raise
            log.info("%s:%s could not be read (%s); reading it again", repo.name, tag, exc)
            sleep(random.uniform(0, backoff))
            continue
        manifests: list[Any] = [] if doc is None else doc["manifests"]
        if any(raw.get("digest") == str(entry.digest) for raw in manifests):
            since = None if wrote_at is None else time.monotonic() - wrote_at
            if since is None or since >= settle:
                return True
            sleep(settle - since + random.uniform(0, _BACKOFF_BASE))
            continue
        if wrote_at is not None:
            log.info("%s:%s lost entry %s to another writer; adding it again", repo.name, tag,
                     entry.digest.short)  # fmt: skip
        base = {"schemaVersion": 2, "mediaType": OCI_INDEX} if doc is None else doc
        data = encode_index({**base, "manifests": [*manifests, entry.to_json()]})
        put_manifest(client, repo, tag, data, OCI_INDEX)
        wrote_at = time.monotonic()
        sleep(random.uniform(0, backoff))
    log.warning(
        "%s:%s: entry %s kept being overwritten by other writers; gave up after %d reads",
        repo.name, tag, entry.digest.short, attempts,
    )  # fmt: skip
    return False


def encode_index(doc: Mapping[str, Any]) -> bytes:
    """Canonical bytes of an index (sorted keys, no white space), checked well-formed first."""
    _check_index(doc, "the index about to be written")
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


# -- reading ------------------------------------------------------------------------


def _from_api(
    client: RegistryClient, repo: Reference, subject: Digest, artifact_type: str
) -> list[Any] | None:
    """The API's descriptors (every page), or None where the registry lacks the API."""
    path = f"/v2/{repo.repository}/referrers/{subject}"
    url = str(httpx.URL(path, params={"artifactType": artifact_type})) if artifact_type else path
    found: list[Any] = []
    for _ in range(_MAX_PAGES):
        response = client.request(
            "GET",
            repo,
            url,
            scope=pull_scope(repo.repository),
            subject=f"the referrers of {subject} in {repo.name}",
            headers={"Accept": OCI_INDEX},
            expect=_NO_API,
        )
        kind = response.headers.get("Content-Type", "").split(";")[0].strip()
        if response.status_code in _NO_API or kind != OCI_INDEX:
            response.close()
            return found or None
        what = f"the referrers of {subject} in {repo.name}"
        doc = _json(_read(response, client, what), what, strict=False)
        _check_index(doc, what, strict=False)
        found.extend(doc["manifests"])
        following = _next_link(response)
        if following is None:
            return found
        url = str(named_url(following, f"the next page of {what}", base=response.url))
    raise LimitExceeded(f"{repo.name}: the referrers of {subject} run past {_MAX_PAGES} pages")


def _read_index(
    client: RegistryClient, repo: Reference, tag: str, *, strict: bool
) -> dict[str, Any] | None:
    """The fallback index under ``tag``, read from the registry itself (None: no such tag).

    ``strict`` (before a rewrite): every entry must be a descriptor; else the
    ones that are not are left for :func:`list_referrers` to skip.
    """
    scope = push_scope(repo.repository) if strict else pull_scope(repo.repository)
    try:
        response = client.request(
            "GET",
            repo,
            f"/v2/{repo.repository}/manifests/{tag}",
            scope=scope,
            subject=f"referrers index {repo.name}:{tag}",
            headers={"Accept": f"{OCI_INDEX}, {OCI_MANIFEST}"},
        )
    except NotFound:
        return None
    kind = response.headers.get("Content-Type", "").split(";")[0].strip()
    what = f"{repo.name}:{tag}"
    doc = _json(_read(response, client, what), what, strict=strict)
    said = doc.get("mediaType", kind) if isinstance(doc, dict) else kind
    if said != OCI_INDEX:
        raise RegistryError(
            f"{what} holds a {said}, not the OCI index the referrers tag schema puts there"
            + _NOT_WRITING[strict]
        )
    _check_index(doc, what, strict=strict)
    assert isinstance(doc, dict)
    return doc


def _read(response: httpx.Response, client: RegistryClient, what: str) -> bytes:
    limit = client.config.max_manifest_bytes
    data = bytearray()
    try:
        for piece in response.iter_bytes():
            data += piece
            if len(data) > limit:
                raise LimitExceeded(f"{what} exceeds the {limit} byte limit for indexes")
    except httpx.HTTPError as exc:
        raise RegistryError(f"{what}: the answer broke off: {exc}") from exc
    finally:
        response.close()
    return bytes(data)


def _json(data: bytes, what: str, *, strict: bool) -> Any:
    try:
        return load_json(data)
    except ValueError as exc:
        raise RegistryError(f"{what} is not valid JSON ({exc})" + _NOT_WRITING[strict]) from exc


def _check_index(doc: Any, what: str, *, strict: bool = True) -> None:
    """An image index, every entry a descriptor if ``strict``; else :class:`RegistryError`."""
    problem = None
    if not isinstance(doc, dict) or not isinstance(doc.get("manifests"), list):
        problem = "is not an image index"
    elif doc.get("schemaVersion") != 2:
        problem = f"has schemaVersion {doc.get('schemaVersion')!r}, not 2"
    elif strict:
        bad = [i for i, raw in enumerate(doc["manifests"]) if _referrer(raw) is None]
        if bad:
            problem = f"has malformed descriptors at {bad[:5]}"
    if problem is not None:
        raise RegistryError(f"{what} {problem}" + _NOT_WRITING[strict])


def _referrer(raw: Any) -> Referrer | None:
    if not isinstance(raw, dict):
        return None
    size, annotations = raw.get("size"), raw.get("annotations") or {}
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return None
    if not isinstance(annotations, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
    ):
        return None
    try:
        digest = Digest.parse(str(raw.get("digest")))
    except HypemanError:
        return None
    kind, artifact = raw.get("mediaType"), raw.get("artifactType", "")
    if not isinstance(kind, str) or not isinstance(artifact, str):
        return None
    return Referrer(kind, digest, size, artifact, dict(annotations))


def _next_link(response: httpx.Response) -> str | None:
    """The target of a ``Link: <url>; rel="next"`` header (RFC 8288), if any."""
    for value in response.headers.get_list("Link", split_commas=True):
        target, _, params = value.partition(";")
        rels = {p.strip().removeprefix("rel=").strip('"') for p in params.split(";")}
        if "next" in rels and target.strip().startswith("<"):
            return target.strip()[1:-1]
    return None


__all__ = [
    "DEFAULT_ATTEMPTS",
    "DEFAULT_SETTLE",
    "Referrer",
    "Referrers",
    "add_referrer",
    "encode_index",
    "fallback_tag",
    "list_referrers",
]
