"""Pushing disks and finding them again, against a real registry (distribution 2.8, no
Referrers API) and, where a test says so, one made to look as if it had the API.
"""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from support.faultproxy import Fault, fault_proxy
from support.fleet import CHUNK, FAST, RUNTIME, index_of, recipe_for, subject_for
from support.registry import RegistryServer, htpasswd_auth, start_registry

from hypeman_images.disk.e2fsprogs import E2fsprogs
from hypeman_images.errors import Unauthorized
from hypeman_images.fleet.artifact import ARTIFACT_TYPE, RECIPE_ANNOTATION
from hypeman_images.fleet.fetch import fetch_disk
from hypeman_images.fleet.lookup import MAX_CANDIDATES, find_disk
from hypeman_images.fleet.push import push_disk
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.reference import Reference
from hypeman_images.oci.spec import OCI_INDEX, OCI_MANIFEST
from hypeman_images.registry.client import RegistryClient
from hypeman_images.registry.credentials import Credential, StaticCredentials
from hypeman_images.registry.push import put_manifest
from hypeman_images.registry.referrers import fallback_tag, list_referrers

SETTLE = 0.1


def test_push_then_fetch_is_byte_identical(
    client: RegistryClient, repo: Reference, ext4_disk: Path, dest: Path, tools: E2fsprogs
) -> None:
    subject = subject_for()
    recipe = recipe_for(subject)
    pushed = push_disk(
        client, repo, ext4_disk, subject, recipe, RUNTIME, chunk_size=CHUNK, settle=SETTLE
    )
    assert pushed.tag == recipe.tag and pushed.indexed == "tag"
    assert pushed.uploaded >= 2  # the chunks of zeros are one blob, uploaded once or twice

    found = find_disk(client, repo, recipe)
    assert found is not None and found.exact and found.via == "tag"
    assert found.artifact.digest == pushed.digest and found.artifact.config.runtime == RUNTIME
    with fetch_disk(client, repo, found.artifact, dest, tools) as fetched:
        assert fetched.path.parent == dest.parent and fetched.path.exists()
        assert fetched.sha256 == Digest.of(ext4_disk.read_bytes())
        fetched.commit()
    assert dest.read_bytes() == ext4_disk.read_bytes()
    assert list(dest.parent.iterdir()) == [dest]

    again = push_disk(
        client, repo, ext4_disk, subject, recipe, RUNTIME, chunk_size=CHUNK, settle=SETTLE
    )
    assert again.digest == pushed.digest and again.uploaded == 0 and again.indexed == "tag"
    index = index_of(f"http://{repo.registry}", repo, subject.digest)
    assert index is not None
    assert [m["digest"] for m in index["manifests"]] == [str(pushed.digest)]  # type: ignore[attr-defined,index]


def test_a_matching_recipe_is_found_through_the_fallback_index(
    client: RegistryClient, repo: Reference, ext4_disk: Path, registry: RegistryServer
) -> None:
    subject = subject_for()
    built = recipe_for(subject, e2fsprogs="1.47.1")
    pushed = push_disk(
        client, repo, ext4_disk, subject, built, RUNTIME, chunk_size=CHUNK, settle=SETTLE
    )
    index = index_of(registry.url, repo, subject.digest)
    assert index is not None and index["mediaType"] == OCI_INDEX
    (entry,) = index["manifests"]  # type: ignore[misc]
    assert entry["artifactType"] == ARTIFACT_TYPE
    assert entry["annotations"] == json.loads(pushed.artifact.manifest.data)["annotations"]

    found = find_disk(client, repo, recipe_for(subject))  # mke2fs 1.47.2 here: no exact tag
    assert found is not None and not found.exact and found.via == "index"
    assert found.artifact.digest == pushed.digest
    assert find_disk(client, repo, recipe_for(subject, free_space=0)) is None
    assert find_disk(client, repo, recipe_for(subject_for())) is None


def test_the_index_prefers_the_exact_recipe(
    repo: Reference, ext4_disk: Path, registry: RegistryServer
) -> None:
    subject = subject_for()
    recipes = [recipe_for(subject, e2fsprogs=v) for v in ("1.47.0", "1.47.2", "1.47.3")]
    with RegistryClient(config=FAST) as client:
        pushed = [
            push_disk(client, repo, ext4_disk, subject, r, RUNTIME, chunk_size=CHUNK, settle=0)
            for r in recipes
        ]
    with fault_proxy(registry.url) as proxy:
        proxy.add(Fault(f"/manifests/{recipes[1].tag}", "status", status=404))
        proxied = replace(repo, registry=proxy.host)
        with RegistryClient(config=FAST) as client:
            found = find_disk(client, proxied, recipes[1])
    assert found is not None and found.exact and found.via == "index"
    assert found.artifact.digest == pushed[1].digest


def test_the_referrers_api_is_asked_first_where_the_registry_has_it(
    client: RegistryClient, repo: Reference, ext4_disk: Path, registry: RegistryServer
) -> None:
    subject = subject_for()
    built = recipe_for(subject, e2fsprogs="1.47.1")
    pushed = push_disk(
        client, repo, ext4_disk, subject, built, RUNTIME, chunk_size=CHUNK, settle=SETTLE
    )
    answer = json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            pushed.artifact.referrer().to_json(),
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": 5,
             "digest": str(Digest.of(b"sbom")), "artifactType": "application/spdx+json"},
        ]}
    ).encode()  # fmt: skip
    with fault_proxy(registry.url) as proxy:
        proxy.add(Fault("/referrers/", "replace", status=200, body=answer,
                        headers={"Content-Type": OCI_INDEX}))  # fmt: skip
        proxied = replace(repo, registry=proxy.host)
        with RegistryClient(config=FAST) as proxied_client:
            listing = list_referrers(proxied_client, proxied, subject.digest, ARTIFACT_TYPE)
            found = find_disk(proxied_client, proxied, recipe_for(subject))
        asked = proxy.requests(f"/referrers/{subject.digest}")
        tag = fallback_tag(subject.digest)
        fallback = [r for r in proxy.requests(f"/manifests/{tag}") if r.path.endswith(tag)]
    assert listing.source == "api" and [e.digest for e in listing.entries] == [pushed.digest]
    assert found is not None and found.via == "api" and found.artifact.digest == pushed.digest
    assert asked and f"artifactType={ARTIFACT_TYPE}".replace("/", "%2F") in asked[0].path
    assert fallback == []


class _IndexingRegistry(httpx.BaseTransport):
    """The real registry, answering ``OCI-Subject`` as one with the Referrers API does."""

    def __init__(self) -> None:
        self._inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self._inner.handle_request(request)
        if request.method == "PUT" and "/manifests/" in request.url.path:
            subject = json.loads(request.content).get("subject")
            if subject:
                response.headers["OCI-Subject"] = subject["digest"]
        return response

    def close(self) -> None:
        self._inner.close()


def test_no_fallback_index_where_the_registry_indexes_the_subject(
    repo: Reference, ext4_disk: Path, registry: RegistryServer
) -> None:
    subject = subject_for()
    with RegistryClient(transport=_IndexingRegistry(), config=FAST) as client:
        pushed = push_disk(
            client, repo, ext4_disk, subject, recipe_for(subject), RUNTIME, chunk_size=CHUNK
        )
    assert pushed.indexed == "api"
    assert index_of(registry.url, repo, subject.digest) is None


def test_concurrent_pushes_for_one_subject_all_end_in_the_index(
    repo: Reference, ext4_disk: Path, registry: RegistryServer
) -> None:
    """Two pushes of one artifact and two of others, at once: every entry stays, once."""
    subject = subject_for()
    recipes = [recipe_for(subject, free_space=n * CHUNK) for n in (1, 1, 2, 3)]
    results: list[str] = []
    start = threading.Barrier(len(recipes))

    def push(recipe: object) -> None:
        with RegistryClient(config=FAST) as client:
            start.wait()
            pushed = push_disk(
                client, repo, ext4_disk, subject, recipe, RUNTIME,  # type: ignore[arg-type]
                chunk_size=4 * CHUNK, settle=1.0,
            )  # fmt: skip
            results.append(f"{pushed.indexed} {pushed.digest}")

    threads = [threading.Thread(target=push, args=(r,)) for r in recipes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and all(r.startswith("tag ") for r in results), results
    index = index_of(registry.url, repo, subject.digest)
    assert index is not None
    listed = [m["digest"] for m in index["manifests"]]  # type: ignore[attr-defined,index]
    assert sorted(listed) == sorted({r.split()[1] for r in results})  # each once


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> RegistryServer:
    tmp = tmp_path_factory.mktemp("basic-registry")
    with start_registry(tmp, auth=htpasswd_auth(tmp, {"bob": "builder"})) as server:
        yield server  # type: ignore[misc]


def test_pushing_needs_credentials_with_push_rights(
    basic_registry: RegistryServer, ext4_disk: Path, tools: E2fsprogs, dest: Path
) -> None:
    subject = subject_for()
    repo = Reference(basic_registry.host, "team/disks")
    recipe = recipe_for(subject)
    with RegistryClient(config=FAST) as anonymous, pytest.raises(Unauthorized, match="anonymous"):
        push_disk(anonymous, repo, ext4_disk, subject, recipe, RUNTIME, chunk_size=4 * CHUNK)
    bob = StaticCredentials({basic_registry.host: Credential("bob", "builder", origin="test")})
    with RegistryClient(credentials=bob, config=FAST) as client:
        pushed = push_disk(
            client, repo, ext4_disk, subject, recipe, RUNTIME, chunk_size=4 * CHUNK, settle=0
        )
        found = find_disk(client, repo, recipe)
        assert found is not None and found.artifact.digest == pushed.digest
        fetch_disk(client, repo, found.artifact, dest, tools).commit()
    assert dest.read_bytes() == ext4_disk.read_bytes()


@pytest.mark.parametrize(("unfit", "found"), [(3, True), (MAX_CANDIDATES + 12, False)])
def test_unfit_referrers_are_passed_over_and_only_so_many_read(
    unfit: int, found: bool, repo: Reference, ext4_disk: Path, registry: RegistryServer,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """Anyone who can push writes the fallback index. Entries that claim the exact recipe
    but name manifests no parser takes (a 5000-digit number in a field of their own, which
    docker-registry stores) come first; each is passed over, and at most MAX_CANDIDATES
    are read before the build may start, so a flood cannot hold it up."""
    subject = subject_for()
    want = recipe_for(subject)
    with RegistryClient(config=FAST) as client:
        real = push_disk(
            client, repo, ext4_disk, subject, recipe_for(subject, e2fsprogs="1.47.1"), RUNTIME,
            chunk_size=CHUNK, settle=0,
        )  # fmt: skip
        honest = real.artifact.referrer().to_json()
        entries = []
        for i in range(unfit):
            data = real.artifact.manifest.data[:-1] + b',"x%d":' % i + b"9" * 5000 + b"}"
            put_manifest(client, repo, str(Digest.of(data)), data, OCI_MANIFEST)
            annotations = {**honest["annotations"], RECIPE_ANNOTATION: want.key}
            entries.append({**honest, "digest": str(Digest.of(data)), "annotations": annotations})
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [*entries, honest]}
        put_manifest(client, repo, fallback_tag(subject.digest), json.dumps(index).encode(),
                     OCI_INDEX)  # fmt: skip
    with fault_proxy(registry.url) as proxy, RegistryClient(config=FAST) as client:
        caplog.clear()
        got = find_disk(client, replace(repo, registry=proxy.host), want)
        reads = len(proxy.requests("/manifests/sha256:"))
    assert (got is not None) is found
    if found:
        assert got is not None and got.artifact.digest == real.digest and not got.exact
        assert reads == unfit + 1
    else:
        assert reads == MAX_CANDIDATES
        assert f"trying the first {MAX_CANDIDATES} only" in caplog.text
    skipped = [r for r in caplog.records if "skipping referrer" in r.getMessage()]
    assert len(skipped) == min(unfit, MAX_CANDIDATES)
    assert all("more than 4300 digits" in r.getMessage() for r in skipped)
