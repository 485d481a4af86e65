"""Registry writes: blobs (HEAD first, then POST and one PUT) and manifests, on a real registry."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace

import httpx
import pytest
from support.faultproxy import Fault, fault_proxy
from support.fleet import FAST, cache_repo
from support.registry import RegistryServer

from hypeman_images.errors import DigestMismatch, RegistryError
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.reference import Reference
from hypeman_images.oci.spec import OCI_MANIFEST
from hypeman_images.registry.client import RegistryClient
from hypeman_images.registry.push import blob_exists, push_blob, put_manifest


@pytest.fixture
def repo(registry: RegistryServer, request: pytest.FixtureRequest) -> Reference:
    return cache_repo(registry.host, request.node.name)


@pytest.fixture
def client() -> Iterator[RegistryClient]:
    with RegistryClient(config=FAST) as c:
        yield c


def test_a_blob_goes_up_once(
    client: RegistryClient, repo: Reference, registry: RegistryServer
) -> None:
    data = b"some bytes" * 1000
    digest = Digest.of(data)
    assert not blob_exists(client, repo, digest)
    with fault_proxy(registry.url) as proxy, RegistryClient(config=FAST) as proxied_client:
        proxied = replace(repo, registry=proxy.host)
        assert push_blob(proxied_client, proxied, digest, data)
        assert not push_blob(proxied_client, proxied, digest, data)  # HEAD finds it
        methods = [entry.method for entry in proxy.log]
    assert methods == ["HEAD", "POST", "PUT", "HEAD"]
    url = f"{registry.url}/v2/{repo.repository}/blobs/{digest}"
    assert httpx.get(url).content == data


def test_an_upload_location_that_is_no_url_is_a_registry_error(
    repo: Reference, registry: RegistryServer
) -> None:
    data = b"x" * 100
    with fault_proxy(registry.url) as proxy, RegistryClient(config=FAST) as proxied_client:
        located = {"Location": "http://[::1/v2/x/blobs/uploads/1"}
        proxy.add(Fault("/blobs/uploads/", "replace", method="POST", status=202, headers=located))
        with pytest.raises(RegistryError, match=r"Location of .* is 'http://\[::1/v2/x/blobs/"):
            push_blob(proxied_client, replace(repo, registry=proxy.host), Digest.of(data), data)
        assert [entry.method for entry in proxy.log] == ["HEAD", "POST"]  # no PUT anywhere


def test_a_blob_that_is_not_its_digest_is_not_sent(client: RegistryClient, repo: Reference) -> None:
    with pytest.raises(DigestMismatch, match="they hash otherwise"):
        push_blob(client, repo, Digest.of(b"a"), b"b")
    assert not blob_exists(client, repo, Digest.of(b"a"))


def test_a_manifest_is_stored_as_sent(
    client: RegistryClient, repo: Reference, registry: RegistryServer
) -> None:
    data = _small_manifest(client, repo)
    pushed = put_manifest(client, repo, "v1", data, OCI_MANIFEST)
    assert pushed.digest == Digest.of(data) and not pushed.subject_indexed
    got = httpx.get(
        f"{registry.url}/v2/{repo.repository}/manifests/v1", headers={"Accept": OCI_MANIFEST}
    )
    assert got.content == data
    with fault_proxy(registry.url) as proxy, RegistryClient(config=FAST) as proxied_client:
        lie = {"Docker-Content-Digest": str(Digest.of(b"other"))}
        proxy.add(Fault("/manifests/", "replace", method="PUT", status=201, headers=lie))
        with pytest.raises(DigestMismatch, match="stored manifest v2"):
            proxied = replace(repo, registry=proxy.host)
            put_manifest(proxied_client, proxied, "v2", data, OCI_MANIFEST)


def _small_manifest(client: RegistryClient, repo: Reference) -> bytes:
    config = b"{}"
    push_blob(client, repo, Digest.of(config), config)
    descriptor = {"mediaType": "application/vnd.example", "digest": str(Digest.of(config)),
                  "size": 2}  # fmt: skip
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": descriptor, "layers": []}
    return json.dumps(doc).encode()


def _refusal(code: str) -> Fault:
    body = json.dumps({"errors": [{"code": code, "message": "injected"}]}).encode()
    json_type = {"Content-Type": "application/json"}
    return Fault("/manifests/", "replace", method="PUT", status=400, body=body, headers=json_type,
                 times=1)  # fmt: skip


@pytest.mark.parametrize(
    ("code", "put_again"), [("MANIFEST_BLOB_UNKNOWN", True), ("MANIFEST_INVALID", False)]
)
def test_a_manifest_refused_for_an_unknown_blob_is_put_again_and_no_other(
    client: RegistryClient, repo: Reference, registry: RegistryServer, code: str, put_again: bool
) -> None:
    """distribution 2.8 may not see a blob while another client commits it again: not final.

    Any other refusal is: the same bytes would be refused again.
    """
    data = _small_manifest(client, repo)
    with fault_proxy(registry.url) as proxy, RegistryClient(config=FAST) as proxied_client:
        proxy.add(_refusal(code))
        proxied = replace(repo, registry=proxy.host)
        if put_again:
            assert put_manifest(proxied_client, proxied, "v1", data, OCI_MANIFEST).digest == (
                Digest.of(data)
            )
        else:
            with pytest.raises(RegistryError, match="HTTP 400") as caught:
                put_manifest(proxied_client, proxied, "v1", data, OCI_MANIFEST)
            assert caught.value.codes == (code,)
        puts = [entry.action for entry in proxy.log if entry.method == "PUT"]
    assert puts == (["replace", None] if put_again else ["replace"])
    got = httpx.get(
        f"{registry.url}/v2/{repo.repository}/manifests/v1", headers={"Accept": OCI_MANIFEST}
    )
    assert (got.content == data) == put_again
