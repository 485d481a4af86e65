"""The registry client against a real docker-registry on 127.0.0.1.

Where a behaviour cannot be provoked from a real registry (429, 5xx
sequences, a body that lies), an ``httpx.MockTransport`` stands in for the
network; each such test says so.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from support.images import make_image, make_layer, push_blob, push_image
from support.pushed import PushedImage
from support.registry import RegistryServer, free_port, start_registry

from hypeman_images.errors import (
    DigestMismatch,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    PlatformNotFound,
    RateLimited,
    RegistryError,
    TransientError,
    UnsupportedManifest,
)
from hypeman_images.oci.digest import Digest, VerifyingStream
from hypeman_images.oci.reference import Reference, parse_reference
from hypeman_images.oci.spec import (
    MAX_DOCUMENT_BYTES,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    Platform,
    parse_manifest_or_index,
)
from hypeman_images.registry.client import RegistryClient
from hypeman_images.registry.config import (
    Mirror,
    RegistryConfig,
    RegistrySettings,
    load_registries_conf,
)
from hypeman_images.registry.credentials import Credential, StaticCredentials
from hypeman_images.registry.manifests import resolve_manifest as resolve
from hypeman_images.registry.manifests import select_manifest
from hypeman_images.registry.retry import backoff

FAST = RegistryConfig(backoff_base=0.0, max_attempts=3)
AMD64 = Platform("linux", "amd64")


@pytest.fixture
def client() -> Iterator[RegistryClient]:
    with RegistryClient(config=FAST) as c:
        yield c


def _manifest(client: RegistryClient, ref: Reference) -> Manifest:
    fetched = client.get_manifest(ref)
    parsed = parse_manifest_or_index(fetched.data, fetched.media_type)
    assert isinstance(parsed, Manifest)
    return parsed


def _download(client: RegistryClient, ref: Reference, descriptor: Descriptor) -> bytes:
    with client.open_blob(ref, descriptor) as chunks:
        stream = VerifyingStream(chunks, descriptor.digest, descriptor.size)
        data = b"".join(stream)
    stream.verify()
    return data


# -- manifests -------------------------------------------------------------------------


def test_manifest_by_tag(client: RegistryClient, alpine_ref: PushedImage) -> None:
    fetched = client.get_manifest(parse_reference(alpine_ref.ref))
    assert fetched.data == alpine_ref.image.manifest
    assert fetched.media_type == OCI_MANIFEST
    assert str(fetched.digest) == alpine_ref.manifest_digest


def test_manifest_by_digest(client: RegistryClient, alpine_ref: PushedImage) -> None:
    fetched = client.get_manifest(parse_reference(alpine_ref.digest_ref))
    assert str(fetched.digest) == alpine_ref.manifest_digest
    assert fetched.data == alpine_ref.image.manifest


def test_resolve_picks_the_platform_from_an_index(
    client: RegistryClient, multiplatform_ref: PushedImage
) -> None:
    resolved = resolve(client, parse_reference(multiplatform_ref.ref), AMD64)
    assert str(resolved.reference.digest) == multiplatform_ref.manifest_digest
    assert resolved.index is not None and resolved.index.media_type == OCI_INDEX
    assert str(resolved.fetched.digest) == multiplatform_ref.image.manifest_digest
    assert str(resolved.manifest.config.digest) == multiplatform_ref.image.config_digest


def test_resolve_an_absent_platform_lists_the_offers(
    client: RegistryClient, multiplatform_ref: PushedImage
) -> None:
    with pytest.raises(PlatformNotFound, match=r"linux/amd64, linux/arm64"):
        resolve(client, parse_reference(multiplatform_ref.ref), Platform("linux", "s390x"))


def test_resolve_a_single_manifest(client: RegistryClient, alpine_ref: PushedImage) -> None:
    resolved = resolve(client, parse_reference(alpine_ref.ref), AMD64)
    assert resolved.index is None
    assert str(resolved.reference.digest) == alpine_ref.manifest_digest
    assert resolved.reference.tag == alpine_ref.tag


# -- blobs -----------------------------------------------------------------------------


def test_blob_streams_in_large_chunks(client: RegistryClient, alpine_ref: PushedImage) -> None:
    ref = parse_reference(alpine_ref.ref)
    layer = _manifest(client, ref).layers[0]
    sizes: list[int] = []
    with client.open_blob(ref, layer) as chunks:
        stream = VerifyingStream(chunks, layer.digest, layer.size)
        for chunk in stream:
            sizes.append(len(chunk))
    stream.verify()
    assert sum(sizes) == layer.size == alpine_ref.image.layers[0].size
    assert all(size >= 1024 * 1024 for size in sizes[:-1]), sizes


def test_config_blob_matches(client: RegistryClient, alpine_ref: PushedImage) -> None:
    ref = parse_reference(alpine_ref.ref)
    config = _manifest(client, ref).config
    assert _download(client, ref, config) == alpine_ref.image.config


# -- not found -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("no/such-repo:latest", id="unknown-repository"),
        pytest.param("library/alpine:no-such-tag", id="unknown-tag"),
        pytest.param("library/alpine@sha256:" + "0" * 64, id="unknown-digest"),
    ],
)
def test_unknown_manifest_is_not_found(
    client: RegistryClient, alpine_ref: PushedImage, name: str
) -> None:
    ref = parse_reference(f"{alpine_ref.registry.host}/{name}")
    with pytest.raises(NotFound) as caught:
        client.get_manifest(ref)
    assert ref.repository in str(caught.value)
    assert (ref.tag or str(ref.digest)) in str(caught.value)


def test_unknown_blob_is_not_found(client: RegistryClient, alpine_ref: PushedImage) -> None:
    ref = parse_reference(alpine_ref.ref)
    missing = Descriptor("application/octet-stream", Digest.of(b"never pushed"), 12)
    with pytest.raises(NotFound, match=str(missing.digest)), client.open_blob(ref, missing):
        pass


# -- scheme ----------------------------------------------------------------------------


def _recording(
    handler: Callable[[httpx.Request], httpx.Response], seen: list[httpx.Request]
) -> httpx.MockTransport:
    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    return httpx.MockTransport(record)


@pytest.mark.parametrize(
    ("registry", "config", "asked"),
    [
        pytest.param(
            "127.0.0.1:5000",
            RegistryConfig(),
            ["https /v2/", "https /v2/a/b/manifests/t"],
            id="loopback-v4-probed",
        ),
        pytest.param(
            "localhost:5000",
            RegistryConfig(),
            ["https /v2/", "https /v2/a/b/manifests/t"],
            id="localhost",
        ),
        pytest.param(
            "[::1]:5000",
            RegistryConfig(),
            ["https /v2/", "https /v2/a/b/manifests/t"],
            id="loopback-v6",
        ),
        pytest.param(
            "localhost:5000",
            RegistryConfig(
                registries={"localhost:5000": RegistrySettings("localhost:5000", False)}
            ),
            ["https /v2/a/b/manifests/t"],
            id="loopback-secure",
        ),
        pytest.param(
            "registry.example", RegistryConfig(), ["https /v2/a/b/manifests/t"], id="remote"
        ),
        pytest.param(
            "build.lan:5000",
            RegistryConfig(insecure_registries=frozenset({"build.lan:5000"})),
            ["https /v2/", "https /v2/a/b/manifests/t"],
            id="insecure-marked",
        ),
    ],
)
def test_scheme(registry: str, config: RegistryConfig, asked: list[str]) -> None:
    # A mock that answers over "TLS": an insecure host is probed once, then spoken to
    # over HTTPS; test_schemes has the fallback to plain HTTP and real servers.
    seen: list[httpx.Request] = []
    transport = _recording(lambda r: httpx.Response(404), seen)
    with RegistryClient(transport=transport, config=config) as c, pytest.raises(NotFound):
        c.get_manifest(Reference(registry, "a/b", "t"))
    assert [f"{r.url.scheme} {r.url.path}" for r in seen] == asked
    assert all(r.url.netloc.decode() == registry for r in seen)


def test_docker_hub_goes_to_its_api_host() -> None:
    # A mock: Docker Hub cannot be reached from the tests.
    seen: list[httpx.Request] = []
    with (
        RegistryClient(transport=_recording(lambda r: httpx.Response(404), seen)) as c,
        pytest.raises(NotFound),
    ):
        c.get_manifest(parse_reference("alpine"))
    assert str(seen[0].url) == "https://registry-1.docker.io/v2/library/alpine/manifests/latest"
    assert "application/vnd.oci.image.index.v1+json" in seen[0].headers["Accept"]


# -- errors that a real registry will not produce on demand (mocks) -----------------------


def _sequence(*responses: httpx.Response) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    seen: list[httpx.Request] = []
    queue = list(responses)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return queue.pop(0) if len(queue) > 1 else queue[0]

    return httpx.MockTransport(handler), seen


# Not loopback: these mocks count requests, and a loopback host would be probed first.
REF = Reference("registry.example:5000", "test/app", "v1")
DOC = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {}}).encode()


def _ok(body: bytes = DOC) -> httpx.Response:
    return httpx.Response(200, content=body, headers={"Content-Type": OCI_MANIFEST})


def test_429_is_rate_limited_at_once() -> None:
    # A mock: docker-registry has no rate limiting.
    transport, seen = _sequence(
        httpx.Response(
            429,
            headers={"Retry-After": "42"},
            json={"errors": [{"code": "TOOMANYREQUESTS", "message": "pull rate limit"}]},
        )
    )
    with (
        RegistryClient(transport=transport, config=FAST) as c,
        pytest.raises(RateLimited) as caught,
    ):
        c.get_manifest(REF)
    assert len(seen) == 1
    assert caught.value.retry_after == 42
    assert "retry after 42 s" in str(caught.value)
    assert "pull rate limit" in str(caught.value)


def test_two_500s_then_success() -> None:
    # A mock: a real registry cannot be made to fail twice and then recover.
    transport, seen = _sequence(httpx.Response(500), httpx.Response(503), _ok())
    with RegistryClient(transport=transport, config=FAST) as c:
        assert c.get_manifest(REF).data == DOC
    assert len(seen) == 3


def test_500_forever_gives_up() -> None:
    # A mock, as above.
    config = RegistryConfig(backoff_base=0.0, max_attempts=4)
    transport, seen = _sequence(httpx.Response(500, json={"errors": [{"code": "UNKNOWN"}]}))
    with (
        RegistryClient(transport=transport, config=config) as c,
        pytest.raises(TransientError, match="after 4 attempts") as caught,
    ):
        c.get_manifest(REF)
    assert len(seen) == 4
    assert caught.value.status == 500


def test_backoff_waits_stay_within_bounds_and_vary() -> None:
    # Full jitter: attempt n waits uniformly in [0, min(max, base * 2**(n-1))].
    config = RegistryConfig(backoff_base=0.5, backoff_max=3.0)
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 3.0), (30, 3.0)]:
        waits = [backoff(attempt, config) for _ in range(300)]
        assert all(0.0 <= w <= ceiling for w in waits), (attempt, max(waits))
        assert len(set(waits)) == len(waits)  # no two clients in step
        # Spread over the whole range (each fails by chance with p = 0.75**300).
        assert min(waits) < ceiling / 4 and max(waits) > ceiling * 3 / 4


def test_retries_sleep_the_jittered_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    # A mock, as above; the sleeps are recorded instead of slept.
    slept: list[float] = []
    monkeypatch.setattr("hypeman_images.registry.retry.time.sleep", slept.append)
    config = RegistryConfig(backoff_base=0.5, backoff_max=1.5, max_attempts=4)
    runs = []
    for _ in range(20):
        slept.clear()
        transport, seen = _sequence(httpx.Response(503))
        with RegistryClient(transport=transport, config=config) as c, pytest.raises(TransientError):
            c.get_manifest(REF)
        assert len(seen) == 4 and len(slept) == 3  # no sleep after the last attempt
        assert all(0 <= w <= cap for w, cap in zip(slept, (0.5, 1.0, 1.5), strict=True))
        runs.append(tuple(slept))
    assert len(set(runs)) == len(runs)


def test_connection_errors_are_transient_and_retried() -> None:
    # A mock: the transport raises what httpx raises for a refused connection.
    calls: list[int] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        raise httpx.ConnectError("connection refused", request=request)

    with (
        RegistryClient(transport=httpx.MockTransport(refuse), config=FAST) as c,
        pytest.raises(TransientError, match="ConnectError") as caught,
    ):
        c.get_manifest(REF)
    assert len(calls) == FAST.max_attempts
    assert isinstance(caught.value.__cause__, TransientError)


@pytest.mark.parametrize("value", ["1e999", "inf", "nan", "soon"])
def test_a_retry_after_that_is_no_delay_is_left_out(value: str) -> None:
    # A mock, as above: a delay no one can wait is not repeated to the caller.
    transport, _ = _sequence(httpx.Response(429, headers={"Retry-After": value}))
    with (
        RegistryClient(transport=transport, config=FAST) as c,
        pytest.raises(RateLimited) as caught,
    ):
        c.get_manifest(REF)
    assert caught.value.retry_after is None
    assert "retry after" not in str(caught.value)


def test_other_4xx_keeps_status_and_codes() -> None:
    # A mock: the status and codes are what matter.
    body = {"errors": [{"code": "DENIED", "message": "requested access is denied"}]}
    transport, seen = _sequence(httpx.Response(400, json=body))
    with (
        RegistryClient(transport=transport, config=FAST) as c,
        pytest.raises(RegistryError) as caught,
    ):
        c.get_manifest(REF)
    assert (caught.value.status, caught.value.codes) == (400, ("DENIED",))
    assert "requested access is denied" in str(caught.value)
    assert len(seen) == 1


@pytest.mark.parametrize(
    "body",
    [b'{"errors":' + b"9" * 5000 + b"}", b"[" * 100_000],
    ids=["long-number", "deep"],
)
def test_an_error_body_no_parser_takes_is_still_the_status(body: bytes) -> None:
    # A mock: a registry's error body is whatever it sends (tests/oci/test_wire.py).
    transport, _ = _sequence(httpx.Response(400, content=body))
    with (
        RegistryClient(transport=transport, config=FAST) as c,
        pytest.raises(RegistryError) as caught,
    ):
        c.get_manifest(REF)
    assert (caught.value.status, caught.value.codes) == (400, ())


def test_manifest_code_not_found_without_404() -> None:
    # A mock: some registries answer 400 with a NOT_FOUND-class code.
    body = {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]}
    transport, _ = _sequence(httpx.Response(400, json=body))
    with RegistryClient(transport=transport, config=FAST) as c, pytest.raises(NotFound):
        c.get_manifest(REF)


def test_manifest_by_digest_that_lies_is_rejected() -> None:
    # A mock: a real registry verifies what it stores.
    ref = REF.with_digest(Digest.of(b"something else"))
    transport, _ = _sequence(_ok())
    with RegistryClient(transport=transport, config=FAST) as c, pytest.raises(DigestMismatch):
        c.get_manifest(ref)


def test_manifest_by_tag_checks_docker_content_digest() -> None:
    # A mock: a registry whose header disagrees with its body.
    response = _ok()
    response.headers["Docker-Content-Digest"] = str(Digest.of(b"other"))
    transport, _ = _sequence(response)
    with RegistryClient(transport=transport, config=FAST) as c, pytest.raises(DigestMismatch):
        c.get_manifest(REF)


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_oversized_manifest_is_refused(declared: bool) -> None:
    # A mock: docker-registry refuses to store such a manifest in the first place.
    big = b" " * (MAX_DOCUMENT_BYTES + 1)

    def handler(request: httpx.Request) -> httpx.Response:
        if declared:
            return httpx.Response(200, content=big)
        return httpx.Response(200, content=iter([big[:1000], big[1000:]]))

    with (
        RegistryClient(transport=httpx.MockTransport(handler), config=FAST) as c,
        pytest.raises(LimitExceeded),
    ):
        c.get_manifest(REF)


def test_schema1_manifest_is_rejected_clearly() -> None:
    # A mock: docker-registry 2.8 no longer accepts schema 1 pushes by default.
    schema1 = json.dumps({"schemaVersion": 1, "name": "test/app", "tag": "v1", "fsLayers": []})
    transport, _ = _sequence(
        httpx.Response(
            200,
            content=schema1.encode(),
            headers={"Content-Type": "application/vnd.docker.distribution.manifest.v1+prettyjws"},
        )
    )
    with (
        RegistryClient(transport=transport, config=FAST) as c,
        pytest.raises(UnsupportedManifest, match="schema 1"),
    ):
        resolve(c, REF, AMD64)


# -- blob bodies that go wrong -----------------------------------------------------------


class _Corrupting(httpx.BaseTransport):
    """The real network, except that blob bodies get one byte flipped."""

    def __init__(self) -> None:
        self._inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self._inner.handle_request(request)
        if "/blobs/" not in request.url.path or response.status_code != 200:
            return response
        body = bytearray(response.read())
        body[len(body) // 2] ^= 0xFF
        return httpx.Response(200, headers=response.headers, content=bytes(body))

    def close(self) -> None:
        self._inner.close()


def test_a_corrupted_blob_fails_the_digest_check(alpine_ref: PushedImage) -> None:
    ref = parse_reference(alpine_ref.ref)
    with RegistryClient(config=FAST) as good:
        config = _manifest(good, ref).config
    with (
        RegistryClient(transport=_Corrupting(), config=FAST) as c,
        pytest.raises(DigestMismatch),
    ):
        _download(c, ref, config)


class _Flaky(httpx.BaseTransport):
    """The real network, except that a blob response dies after ``cut`` bytes, ``times`` times."""

    def __init__(self, cut: int, times: int = 1, honour_range: bool = True) -> None:
        self._inner = httpx.HTTPTransport()
        self.cut, self.times, self.honour_range = cut, times, honour_range
        self.ranges: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if "/blobs/" in request.url.path:
            self.ranges.append(request.headers.get("Range"))
            if not self.honour_range and "Range" in request.headers:
                del request.headers["Range"]
        response = self._inner.handle_request(request)
        if "/blobs/" not in request.url.path or self.times == 0:
            return response
        self.times -= 1
        body = response.read()
        cut = self.cut

        def dying() -> Iterator[bytes]:
            yield body[:cut]
            raise httpx.ReadError("connection reset by peer", request=request)

        headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
        return httpx.Response(response.status_code, headers=headers, content=dying())

    def close(self) -> None:
        self._inner.close()


@pytest.mark.parametrize("honour_range", [True, False], ids=["range", "range-ignored"])
def test_a_dropped_blob_download_resumes(alpine_ref: PushedImage, honour_range: bool) -> None:
    # Wraps the real registry; the connection drop itself is simulated in the
    # transport (test_resilience's TCP proxy does it on the wire).
    ref = parse_reference(alpine_ref.ref)
    layer = alpine_ref.image.layers[0]
    descriptor = Descriptor(layer.media_type, Digest.parse(layer.digest), layer.size)
    flaky = _Flaky(cut=1_500_000, times=2, honour_range=honour_range)
    with RegistryClient(transport=flaky, config=FAST) as c:
        assert _download(c, ref, descriptor) == layer.blob
    # Each resumption asks for the first byte not yet delivered: the 1.5 MB
    # that arrived before the drop are kept, whatever the chunking.
    second = "bytes=3000000-" if honour_range else "bytes=1500000-"
    assert flaky.ranges == [None, "bytes=1500000-", second]


class _RangeLiar(_Flaky):
    """A resumed blob whose ``Content-Range`` says ``said`` instead of the real start."""

    def __init__(self, said: str) -> None:
        super().__init__(cut=1_500_000)
        self.said = said

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if response.status_code == 206:
            response.headers["Content-Range"] = self.said
        return response


@pytest.mark.parametrize(
    "said",
    ["bytes \u00b2500000-2999999/3000000", "bytes " + "1" * 5000 + "-2/3", "bytes 0-9/10"],
    ids=["superscript-digit", "long-number", "another-start"],
)
def test_a_resumed_range_that_starts_elsewhere_is_refused(
    alpine_ref: PushedImage, said: str
) -> None:
    # Wraps the real registry, as above; only the 206's Content-Range is rewritten.
    ref = parse_reference(alpine_ref.ref)
    layer = alpine_ref.image.layers[0]
    descriptor = Descriptor(layer.media_type, Digest.parse(layer.digest), layer.size)
    with (
        RegistryClient(transport=_RangeLiar(said), config=FAST) as c,
        pytest.raises(RegistryError, match="asked to resume at byte 1500000"),
    ):
        _download(c, ref, descriptor)


def test_resumption_is_bounded(alpine_ref: PushedImage) -> None:
    ref = parse_reference(alpine_ref.ref)
    layer = alpine_ref.image.layers[0]
    descriptor = Descriptor(layer.media_type, Digest.parse(layer.digest), layer.size)
    config = RegistryConfig(backoff_base=0.0, resume_attempts=2, chunk_size=64 * 1024)
    flaky = _Flaky(cut=100_000, times=99)
    with (
        RegistryClient(transport=flaky, config=config) as c,
        pytest.raises(TransientError, match="gave up after 2 resumptions"),
    ):
        _download(c, ref, descriptor)
    assert len(flaky.ranges) == 3


# -- redirects -------------------------------------------------------------------------


def test_redirect_to_another_host_drops_authorization() -> None:
    # A mock: docker-registry redirects only with cloud storage drivers.
    blob = b"layer bytes"
    digest = Digest.of(blob)
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "storage.example":
            return httpx.Response(200, content=blob)
        if "Authorization" not in request.headers:
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="registry"'})
        return httpx.Response(307, headers={"Location": "https://storage.example/x?sig=1"})

    credentials = StaticCredentials({"registry.example": Credential("u", "p", origin="test")})
    ref = Reference("registry.example", "a/b", "t")
    with RegistryClient(transport=httpx.MockTransport(handler), credentials=credentials) as c:
        data = _download(c, ref, Descriptor("application/octet-stream", digest, len(blob)))
    assert data == blob
    assert [r.url.host for r in seen] == ["registry.example", "registry.example", "storage.example"]
    assert seen[1].headers["Authorization"].startswith("Basic ")
    assert "Authorization" not in seen[2].headers


# -- indexes ---------------------------------------------------------------------------


def test_attestation_entries_are_skipped() -> None:
    digest = Digest.of(b"x")
    attestation = Descriptor(
        OCI_MANIFEST,
        Digest.of(b"attestation"),
        10,
        Platform("unknown", "unknown"),
        annotations={"vnd.docker.reference.type": "attestation-manifest"},
    )
    index = Index(OCI_INDEX, (attestation, Descriptor(OCI_MANIFEST, digest, 1, AMD64)))
    assert select_manifest(index, AMD64).digest == digest
    with pytest.raises(PlatformNotFound) as caught:
        select_manifest(index, Platform("linux", "arm64"))
    assert "unknown" not in str(caught.value)


def test_private_blob_push_helper_roundtrip(
    registry: RegistryServer, client: RegistryClient
) -> None:
    # A small image pushed here, so the blob tests do not depend on alpine alone.
    layer = make_layer(b"\0" * 1024, "none")
    image = make_image([layer])
    push_image(registry.url, "test/small", "v1", image)
    push_blob(registry.url, "test/small", b"extra")
    ref = parse_reference(f"{registry.host}/test/small:v1")
    manifest = _manifest(client, ref)
    assert _download(client, ref, manifest.layers[0]) == layer.blob


# -- TLS -------------------------------------------------------------------------------


def _certificate(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Certificate, Any] | None
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            False,
        )
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


@dataclass
class TLSRegistry:
    server: RegistryServer
    ca_pem: bytes
    ref: Reference


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSRegistry]:
    tmp = tmp_path_factory.mktemp("tls-registry")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("hypeman test CA", ca_key, None)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate("127.0.0.1", key, (ca, ca_key))
    pem = serialization.Encoding.PEM
    (tmp / "cert.pem").write_bytes(cert.public_bytes(pem))
    (tmp / "key.pem").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    with start_registry(tmp, tls=(tmp / "cert.pem", tmp / "key.pem")) as server:
        image = make_image([make_layer(b"\3" * 4096, "gzip")])
        with httpx.Client(verify=False) as pusher:  # the pusher is not under test
            push_image(server.url, "secure/app", "v1", image, client=pusher)
        yield TLSRegistry(
            server, ca.public_bytes(pem), parse_reference(f"{server.host}/secure/app:v1")
        )


def test_tls_with_a_certs_d_directory(tls_registry: TLSRegistry, tmp_path: Path) -> None:
    host_dir = tmp_path / "certs.d" / tls_registry.server.host
    host_dir.mkdir(parents=True)
    (host_dir / "ca.crt").write_bytes(tls_registry.ca_pem)
    config = RegistryConfig(backoff_base=0.0, certs_dirs=(tmp_path / "certs.d",))
    assert config.verifies_tls(tls_registry.server.host)  # loopback, but certs.d says verify
    with RegistryClient(config=config) as client:
        assert _manifest(client, tls_registry.ref).layers


def test_tls_with_a_ca_bundle(tls_registry: TLSRegistry, tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_bytes(tls_registry.ca_pem)
    host = tls_registry.server.host
    config = RegistryConfig(
        backoff_base=0.0,
        ca_bundle=tmp_path / "ca.pem",
        registries={host: RegistrySettings(host, insecure=False)},
    )
    with RegistryClient(config=config) as client:
        assert _manifest(client, tls_registry.ref).layers


def test_tls_with_an_unknown_ca_fails_once_and_says_why(tls_registry: TLSRegistry) -> None:
    host = tls_registry.server.host
    config = RegistryConfig(
        backoff_base=0.0, registries={host: RegistrySettings(host, insecure=False)}
    )
    with (
        RegistryClient(config=config) as client,
        pytest.raises(RegistryError, match="certificate") as caught,
    ):
        client.get_manifest(tls_registry.ref)
    assert not isinstance(caught.value, TransientError)  # not retried
    assert "certs.d" in str(caught.value)


# -- mirrors ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mirror(
    registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RegistryServer]:
    """docker-registry as a pull-through cache of the session registry (the "origin")."""
    with start_registry(tmp_path_factory.mktemp("mirror"), proxy_remote_url=registry.url) as server:
        yield server


def _mirrored(origin: str, *mirrors: str) -> RegistryConfig:
    return RegistryConfig(
        backoff_base=0.0,
        max_attempts=2,
        registries={origin: RegistrySettings(origin, mirrors=tuple(Mirror(m) for m in mirrors))},
    )


def test_a_mirror_is_asked_first(alpine_ref: PushedImage, mirror: RegistryServer) -> None:
    # docker.io cannot be reached here, so the mirror is configured for the
    # origin registry's own host name, exactly as it would be for docker.io.
    ref = parse_reference(alpine_ref.ref)
    with RegistryClient(config=_mirrored(ref.registry, mirror.host)) as client:
        resolved = resolve(client, ref, AMD64)
        assert _download(client, ref, resolved.manifest.config) == alpine_ref.image.config
    assert str(resolved.reference.digest) == alpine_ref.manifest_digest
    log = mirror.log()
    assert f"/v2/{ref.repository}/manifests/{ref.tag}" in log
    assert f"/v2/{ref.repository}/blobs/{resolved.manifest.config.digest}" in log


def test_a_dead_mirror_falls_back_to_the_origin(alpine_ref: PushedImage) -> None:
    ref = parse_reference(alpine_ref.ref)
    dead = f"127.0.0.1:{free_port()}"
    with RegistryClient(config=_mirrored(ref.registry, dead)) as client:
        resolved = resolve(client, ref, AMD64)
        assert _download(client, ref, resolved.manifest.config) == alpine_ref.image.config


def test_registries_conf(tmp_path: Path) -> None:
    path = tmp_path / "registries.conf"
    path.write_text(
        'insecure-registries = ["build.lan:5000"]\n'
        f'certs-dirs = ["{tmp_path}"]\n'
        "[[registry]]\n"
        'location = "docker.io"\n'
        "[[registry.mirror]]\n"
        'location = "mirror.lan:5000"\n'
        "insecure = true\n"
        "[[registry.mirror]]\n"
        'location = "mirror2.example"\n'
        "[[registry]]\n"
        'location = "localhost:5000"\n'
        "insecure = false\n"
    )
    config = RegistryConfig(max_attempts=7, read_timeout=5).with_registries_conf(path)
    assert config.max_attempts == 7
    # Keys the file does not set keep the config's values.
    assert (config.connect_timeout, config.read_timeout) == (10.0, 5)
    assert not config.allow_foreign_layers
    assert config.mirrors_for("docker.io") == (
        Mirror("mirror.lan:5000", insecure=True),
        Mirror("mirror2.example"),
    )
    assert config.certs_dirs == (tmp_path,)
    hosts = ("build.lan:5000", "mirror.lan:5000", "mirror2.example", "localhost:5000")
    assert [config.verifies_tls(h) for h in hosts] == [False, False, True, True]
    assert not config.verifies_tls("localhost:5001")
    client = RegistryClient(config=config)
    endpoints = [(e.host, e.mirror) for e in client.endpoints(parse_reference("alpine"))]
    client.close()
    assert endpoints == [
        ("mirror.lan:5000", True),
        ("mirror2.example", True),
        ("registry-1.docker.io", False),
    ]


def test_registries_conf_timeouts_and_foreign_layers(tmp_path: Path) -> None:
    path = tmp_path / "registries.conf"
    path.write_text("connect-timeout = 2.5\nread-timeout = 30\nallow-foreign-layers = true\n")
    config = RegistryConfig(connect_timeout=1, read_timeout=1).with_registries_conf(path)
    assert (config.connect_timeout, config.read_timeout) == (2.5, 30.0)
    assert config.allow_foreign_layers
    assert load_registries_conf(path) == config


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("connect-timeout = 0", "'connect-timeout' must be a number of seconds above 0"),
        ('read-timeout = "60"', "'read-timeout' must be a number of seconds"),
        ("read-timeout = true", "'read-timeout' must be a number of seconds"),
        ('allow-foreign-layers = "yes"', "'allow-foreign-layers' must be true or false"),
    ],
)
def test_registries_conf_bad_scalars(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "registries.conf"
    path.write_text(line + "\n")
    with pytest.raises(InvalidArgument, match=message):
        load_registries_conf(path)


def test_registries_conf_errors(tmp_path: Path) -> None:
    path = tmp_path / "registries.conf"
    path.write_text("[[registry]]\ninsecure = true\n")
    with pytest.raises(InvalidArgument, match="location"):
        load_registries_conf(path)
    path.write_text("[[registry\n")
    with pytest.raises(InvalidArgument, match="TOML"):
        load_registries_conf(path)


# -- a connection cut on the wire --------------------------------------------------------


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 that cuts the first connection whose response
    passes ``cut_after`` bytes, once; every other connection passes untouched."""

    def __init__(self, upstream_port: int, cut_after: int) -> None:
        self.upstream_port = upstream_port
        self.cut_after = cut_after
        self.cuts = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, downstream: bool) -> None:
        sent = 0
        try:
            while data := source.recv(65536):
                if downstream:
                    with self._lock:
                        cut = self.cuts == 0 and sent + len(data) > self.cut_after
                        if cut:
                            self.cuts += 1
                    if cut:
                        sink.sendall(data[: self.cut_after - sent])
                        break
                sink.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def test_a_connection_cut_mid_blob_resumes(alpine_ref: PushedImage) -> None:
    proxy = CuttingProxy(alpine_ref.registry.port, cut_after=2_000_000)
    try:
        ref = parse_reference(f"127.0.0.1:{proxy.port}/{alpine_ref.repository}:{alpine_ref.tag}")
        with RegistryClient(config=FAST) as client:
            layer = _manifest(client, ref).layers[0]
            assert layer.size > 2_000_000
            assert _download(client, ref, layer) == alpine_ref.image.layers[0].blob
        assert proxy.cuts == 1
    finally:
        proxy.close()


# -- foreign layers ----------------------------------------------------------------------

FOREIGN = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"


def test_foreign_layers_come_from_their_urls_only_when_allowed(
    alpine_ref: PushedImage,
) -> None:
    config_blob = alpine_ref.image.config
    digest = Digest.of(config_blob)
    where = f"{alpine_ref.registry.url}/v2/{alpine_ref.repository}/blobs/{digest}"
    descriptor = Descriptor(FOREIGN, digest, len(config_blob), urls=(where,))
    # A repository that lacks the blob, as registries lack foreign layers.
    ref = parse_reference(f"{alpine_ref.registry.host}/test/no-foreign-layers:v1")
    with (
        RegistryClient(config=FAST) as client,
        pytest.raises(NotFound, match="--allow-foreign-layers"),
    ):
        _download(client, ref, descriptor)
    allowed = RegistryConfig(backoff_base=0.0, allow_foreign_layers=True)
    with RegistryClient(config=allowed) as client:
        assert _download(client, ref, descriptor) == config_blob


# -- rate-limit headers ----------------------------------------------------------------


def test_docker_hub_rate_limit_headers_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    # A mock: only Docker Hub sends these headers.
    response = _ok()
    response.headers["RateLimit-Limit"] = "100;w=21600"
    response.headers["RateLimit-Remaining"] = "97;w=21600"
    transport, _ = _sequence(response)
    with (
        caplog.at_level(logging.DEBUG, logger="hypeman_images"),
        RegistryClient(transport=transport, config=FAST) as client,
    ):
        client.get_manifest(REF)
    assert "limit=100;w=21600 remaining=97;w=21600" in caplog.text


def test_registry_error_text_is_short_and_printable() -> None:
    from hypeman_images.registry.responses import MAX_MESSAGE, error_details

    body = json.dumps(
        {"errors": [{"code": "DENIED", "message": "\x1b[31mred\x1b[0m " + "x" * 10_000}]}
    ).encode()
    codes, message = error_details(body)
    assert codes == ("DENIED",)
    assert len(message) <= MAX_MESSAGE
    assert "\x1b" not in message
