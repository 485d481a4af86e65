"""Push images to a registry with plain httpx (OCI Distribution spec, push section).

Deliberately independent of the project's registry client: the tests check
that client against what this pusher put in a real registry. Blobs go up as
monolithic uploads (``POST /v2/<repo>/blobs/uploads/`` then
``PUT <location>?digest=…``), skipped when ``HEAD`` finds them already there.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from .images import Image, Index

_INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@contextmanager
def _client(client: httpx.Client | None) -> Iterator[httpx.Client]:
    if client is not None:
        yield client
        return
    with httpx.Client(timeout=30.0) as own:
        yield own


def _check(response: httpx.Response, expected: int) -> httpx.Response:
    if response.status_code != expected:
        raise AssertionError(
            f"{response.request.method} {response.request.url} -> {response.status_code}, "
            f"expected {expected}: {response.text[:2000]}"
        )
    return response


def push_blob(
    registry_url: str, repo: str, data: bytes, *, client: httpx.Client | None = None
) -> str:
    """Upload one blob unless the registry has it; return its digest."""
    digest = _digest(data)
    with _client(client) as http:
        base = f"{registry_url}/v2/{repo}/blobs"
        if http.head(f"{base}/{digest}").status_code == 200:
            return digest
        started = _check(http.post(f"{base}/uploads/"), 202)
        # Location may be relative and usually carries a ``_state`` query.
        location = httpx.URL(registry_url).join(started.headers["location"])
        location = location.copy_merge_params({"digest": digest})
        headers = {"Content-Type": "application/octet-stream"}
        done = _check(http.put(location, content=data, headers=headers), 201)
        assert done.headers.get("docker-content-digest", digest) == digest
    return digest


def push_manifest(
    registry_url: str,
    repo: str,
    reference: str,
    body: bytes,
    media_type: str,
    *,
    client: httpx.Client | None = None,
) -> str:
    """PUT a manifest (or index) under a tag or digest; return its digest."""
    digest = _digest(body)
    with _client(client) as http:
        response = http.put(
            f"{registry_url}/v2/{repo}/manifests/{reference}",
            content=body,
            headers={"Content-Type": media_type},
        )
        _check(response, 201)
    served = response.headers.get("docker-content-digest")
    assert served in (None, digest), f"registry says {served}, pushed {digest}"
    return digest


def push_image(
    registry_url: str, repo: str, tag: str, image: Image, *, client: httpx.Client | None = None
) -> str:
    """Push an image's blobs then its manifest under ``tag``; return the manifest digest."""
    with _client(client) as http:
        for blob in image.blobs.values():
            push_blob(registry_url, repo, blob, client=http)
        return push_manifest(
            registry_url, repo, tag, image.manifest, image.manifest_media_type, client=http
        )


def push_index(
    registry_url: str, repo: str, tag: str, index: Index, *, client: httpx.Client | None = None
) -> str:
    """Push every child image by digest, then the index under ``tag``; return its digest."""
    with _client(client) as http:
        for image in index.images:
            push_image(registry_url, repo, image.manifest_digest, image, client=http)
        return push_manifest(registry_url, repo, tag, index.manifest, index.media_type, client=http)


def _layout_blob(layout: Path, digest: str) -> bytes:
    algorithm, _, hex_ = digest.partition(":")
    data = (layout / "blobs" / algorithm / hex_).read_bytes()
    if algorithm == "sha256" and _digest(data) != digest:
        raise AssertionError(f"layout blob {digest} does not match its digest")
    return data


def _push_layout_descriptor(
    http: httpx.Client,
    registry_url: str,
    repo: str,
    reference: str,
    desc: dict[str, Any],
    layout: Path,
) -> str:
    body = _layout_blob(layout, desc["digest"])
    document = json.loads(body)
    media_type = desc.get("mediaType") or document.get("mediaType")
    if media_type in _INDEX_TYPES:
        for child in document["manifests"]:
            _push_layout_descriptor(http, registry_url, repo, child["digest"], child, layout)
    else:
        for blob_desc in [document["config"], *document.get("layers", [])]:
            push_blob(registry_url, repo, _layout_blob(layout, blob_desc["digest"]), client=http)
    return push_manifest(registry_url, repo, reference, body, media_type, client=http)


def push_oci_layout(
    registry_url: str,
    repo: str,
    tag: str,
    layout_dir: Path | str,
    *,
    client: httpx.Client | None = None,
) -> str:
    """Push an OCI image layout byte for byte; return the pushed top-level digest.

    The entry of ``index.json`` is the only one, or the one whose
    ``org.opencontainers.image.ref.name`` is ``tag`` or ends with ``:tag``.
    If it points at an index, every child is pushed (by digest) before it.
    """
    layout = Path(layout_dir)
    entries = json.loads((layout / "index.json").read_text())["manifests"]
    if len(entries) != 1:
        entries = [
            e
            for e in entries
            if (name := e.get("annotations", {}).get("org.opencontainers.image.ref.name", ""))
            in (tag,)
            or name.endswith(":" + tag)
        ]
    if len(entries) != 1:
        raise AssertionError(f"{layout}: cannot choose one index.json entry for tag {tag!r}")
    with _client(client) as http:
        return _push_layout_descriptor(http, registry_url, repo, tag, entries[0], layout)
