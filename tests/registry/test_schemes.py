"""Insecure registries as docker and containers/image treat them: HTTPS first, unverified,
then plain HTTP if TLS is not offered; every other host gets verified HTTPS only.

The decision table is pinned with an ``httpx.MockTransport`` (it is about which
requests are sent); the behaviours users see are checked against real
docker-registry servers on 127.0.0.1: one over HTTPS with a self-signed
certificate, the session's plain-HTTP one. A non-loopback name (``*.lan``) is
mapped to 127.0.0.1 by patching ``socket.getaddrinfo`` in the test process.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.images import alpine_3_20_3, push_image
from support.pushed import PushedImage
from support.registry import RegistryServer, self_signed_cert, start_registry
from support.service import CLI

from hypeman_images.errors import RegistryError, TransientError
from hypeman_images.oci.digest import Digest, VerifyingStream
from hypeman_images.oci.reference import Reference, parse_reference
from hypeman_images.oci.spec import OCI_MANIFEST, Descriptor, Platform
from hypeman_images.registry.client import RegistryClient
from hypeman_images.registry.config import Mirror, RegistryConfig, RegistrySettings
from hypeman_images.registry.manifests import resolve_manifest as resolve

FAST = RegistryConfig(backoff_base=0.0, max_attempts=2)
AMD64 = Platform("linux", "amd64")
INSECURE = "build.lan:5000"
MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {}}).encode()


# -- the decision, against mocks ---------------------------------------------------------


def _tls_refused() -> httpx.ConnectError:
    """What httpx raises when the server answers a TLS hello in plain text."""
    error = httpx.ConnectError("[SSL: WRONG_VERSION_NUMBER] wrong version number")
    cause = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    cause.reason = "WRONG_VERSION_NUMBER"  # as the ssl module sets it
    error.__cause__ = cause
    return error


def _refused() -> httpx.ConnectError:
    error = httpx.ConnectError("[Errno 111] Connection refused")
    error.__cause__ = ConnectionRefusedError(111, "Connection refused")
    return error


def _manifest() -> httpx.Response:
    return httpx.Response(200, content=MANIFEST, headers={"Content-Type": OCI_MANIFEST})


Answer = Callable[[httpx.Request], httpx.Response]


def _registry(https_ping: Answer, http_ping: Answer) -> tuple[httpx.MockTransport, list[str]]:
    """A mock host: ``/v2/`` answered per scheme, manifests over whichever scheme is asked."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.url.scheme} {request.url.path}")
        if request.url.path == "/v2/":
            return (https_ping if request.url.scheme == "https" else http_ping)(request)
        return _manifest()

    return httpx.MockTransport(handler), seen


def _raise(error: Callable[[], Exception]) -> Answer:
    def answer(request: httpx.Request) -> httpx.Response:
        raise error()

    return answer


def _status(code: int) -> Answer:
    return lambda request: httpx.Response(code)


def _read_timeout(request: httpx.Request) -> httpx.Response:
    raise httpx.ReadTimeout("timed out", request=request)


@pytest.mark.parametrize(
    ("https_ping", "http_ping", "asked"),
    [
        pytest.param(
            _status(401), _status(200), ["https /v2/", "https /v2/a/b/manifests/t"], id="tls-401"
        ),
        pytest.param(
            _status(500), _status(200), ["https /v2/", "https /v2/a/b/manifests/t"], id="tls-500"
        ),
        pytest.param(
            _read_timeout,
            _status(200),
            ["https /v2/", "https /v2/a/b/manifests/t"],
            id="tls-then-silence",
        ),
        pytest.param(
            _raise(_tls_refused),
            _status(200),
            ["https /v2/", "http /v2/a/b/manifests/t"],
            id="plain-text-answer",
        ),
        pytest.param(
            _raise(_refused),
            _status(401),
            ["https /v2/", "http /v2/", "http /v2/a/b/manifests/t"],
            id="https-refused-http-registry",
        ),
    ],
)
def test_an_insecure_host_is_probed_once(
    https_ping: Answer, http_ping: Answer, asked: list[str]
) -> None:
    transport, seen = _registry(https_ping, http_ping)
    config = RegistryConfig(insecure_registries=frozenset({INSECURE}))
    with RegistryClient(transport=transport, config=config) as client:
        client.get_manifest(Reference(INSECURE, "a/b", "t"))
        client.get_manifest(Reference(INSECURE, "a/b", "t"))
    assert seen == [*asked, asked[-1]]  # the second pull asks no question


@pytest.mark.parametrize(
    ("http_ping", "says"),
    [
        pytest.param(_raise(_refused), "or plain HTTP", id="both-refused"),
        pytest.param(_status(404), "answered GET /v2/ with 404", id="http-not-a-registry"),
    ],
)
def test_an_undecided_probe_is_transient_and_not_remembered(http_ping: Answer, says: str) -> None:
    transport, seen = _registry(_raise(_refused), http_ping)
    config = RegistryConfig(
        backoff_base=0.0, max_attempts=2, insecure_registries=frozenset({INSECURE})
    )
    with (
        RegistryClient(transport=transport, config=config) as client,
        pytest.raises(TransientError, match=says) as caught,
    ):
        client.get_manifest(Reference(INSECURE, "a/b", "t"))
    assert "gave up after 2 attempts" in str(caught.value)
    assert seen == ["https /v2/", "http /v2/"] * 2  # probed again on the retry


def test_threads_wait_for_one_probe() -> None:
    probes = 0

    def slow_plain_text(request: httpx.Request) -> httpx.Response:
        nonlocal probes
        probes += 1
        time.sleep(0.1)
        raise _tls_refused()

    transport, seen = _registry(slow_plain_text, _status(200))
    config = RegistryConfig(insecure_registries=frozenset({INSECURE}))
    with RegistryClient(transport=transport, config=config) as client:
        threads = [
            threading.Thread(target=client.get_manifest, args=(Reference(INSECURE, "a/b", "t"),))
            for _ in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert probes == 1
    assert sorted(seen) == ["http /v2/a/b/manifests/t"] * 8 + ["https /v2/"]


def test_a_failed_connection_makes_the_retry_probe_again() -> None:
    # The registry restarts between two requests, now speaking TLS.
    seen: list[str] = []
    restarted = False

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal restarted
        seen.append(f"{request.url.scheme} {request.url.path}")
        if not restarted:
            if request.url.scheme == "https":
                raise _tls_refused()
            if request.url.path.endswith("/one"):
                return _manifest()
            restarted = True
            raise _refused()
        if request.url.scheme == "http":
            return httpx.Response(400, text="Client sent an HTTP request to an HTTPS server.")
        return httpx.Response(401) if request.url.path == "/v2/" else _manifest()

    config = RegistryConfig(backoff_base=0.0, insecure_registries=frozenset({INSECURE}))
    with RegistryClient(transport=httpx.MockTransport(handler), config=config) as client:
        client.get_manifest(Reference(INSECURE, "a/b", "one"))
        client.get_manifest(Reference(INSECURE, "a/b", "two"))
    assert seen == [
        "https /v2/",
        "http /v2/a/b/manifests/one",
        "http /v2/a/b/manifests/two",  # refused: forgotten, retried
        "https /v2/",
        "https /v2/a/b/manifests/two",
    ]


def test_a_secure_host_is_never_downgraded() -> None:
    seen: list[str] = []

    def manifest_over_plain_text(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.url.scheme} {request.url.path}")
        raise _tls_refused()

    with (
        RegistryClient(transport=httpx.MockTransport(manifest_over_plain_text)) as client,
        pytest.raises(RegistryError, match=r"--insecure-registry registry\.example") as caught,
    ):
        client.get_manifest(Reference("registry.example", "a/b", "t"))
    assert not isinstance(caught.value, TransientError)  # a plain-HTTP server stays one
    assert seen == ["https /v2/a/b/manifests/t"]


def test_redirects_from_an_insecure_plain_http_host() -> None:
    # A mock: docker-registry redirects only with cloud storage drivers.
    blob = b"layer bytes"
    digest = Digest.of(blob)
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.url.scheme}://{request.url.netloc.decode()}{request.url.path}")
        if request.url.host == "storage.example":
            return httpx.Response(200, content=blob)
        if request.url.scheme == "https":
            raise _tls_refused()
        if request.url.path.endswith("/moved"):
            return httpx.Response(307, headers={"Location": "https://storage.example/x"})
        return httpx.Response(307, headers={"Location": "/v2/a/b/moved"})

    config = RegistryConfig(insecure_registries=frozenset({INSECURE}))
    with RegistryClient(transport=httpx.MockTransport(handler), config=config) as client:
        descriptor = Descriptor("application/octet-stream", digest, len(blob))
        with client.open_blob(Reference(INSECURE, "a/b", "t"), descriptor) as chunks:
            assert b"".join(chunks) == blob
    assert seen == [
        f"https://{INSECURE}/v2/",
        f"http://{INSECURE}/v2/a/b/blobs/{digest}",
        f"http://{INSECURE}/v2/a/b/moved",
        "https://storage.example/x",  # not insecure: verified HTTPS, no probe
    ]


# -- against real registries -------------------------------------------------------------


@dataclass
class TLSRegistry:
    """docker-registry over HTTPS with a self-signed certificate nobody was told about."""

    server: RegistryServer
    repository: str
    tag: str
    manifest_digest: str


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSRegistry]:
    tmp = tmp_path_factory.mktemp("self-signed-registry")
    with start_registry(tmp, tls=self_signed_cert(tmp)) as server:
        with httpx.Client(verify=False) as pusher:  # the pusher is not under test
            digest = push_image(
                server.url, "secure/alpine", "3.20.3", alpine_3_20_3(), client=pusher
            )
        yield TLSRegistry(server, "secure/alpine", "3.20.3", digest)


@pytest.fixture
def lan(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resolve every ``*.lan`` name to 127.0.0.1, as if it were another machine."""
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host.endswith(".lan"):
            host = "127.0.0.1"
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)


def _pull(client: RegistryClient, ref: Reference) -> str:
    """Resolve ``ref`` and download every blob, verified; the manifest digest."""
    resolved = resolve(client, ref, AMD64)
    for descriptor in (resolved.manifest.config, *resolved.manifest.layers):
        with client.open_blob(ref, descriptor) as chunks:
            stream = VerifyingStream(chunks, descriptor.digest, descriptor.size)
            for _ in stream:
                pass
        stream.verify()
    return str(resolved.reference.digest)


def _ref(host: str, repository: str, tag: str) -> Reference:
    return parse_reference(f"{host}/{repository}:{tag}")


def _insecure(name: str, port: int, how: str) -> tuple[str, RegistryConfig]:
    """``name.lan:port`` marked insecure, or the loopback address insecure by default."""
    if how == "marked":
        host = f"{name}.lan:{port}"
        return host, RegistryConfig(backoff_base=0.0, insecure_registries=frozenset({host}))
    return f"127.0.0.1:{port}", RegistryConfig(backoff_base=0.0)


@pytest.mark.parametrize("how", ["marked", "loopback"])
@pytest.mark.usefixtures("lan")
def test_self_signed_https_registry_marked_insecure(
    tls_registry: TLSRegistry, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    host, config = _insecure("tls", tls_registry.server.port, how)
    caplog.set_level(logging.INFO, logger="hypeman_images")
    with RegistryClient(config=config) as client:
        ref = _ref(host, tls_registry.repository, tls_registry.tag)
        assert _pull(client, ref) == tls_registry.manifest_digest
    assert f"{host}: insecure registry, using HTTPS without certificate verification" in caplog.text


@pytest.mark.parametrize("how", ["remote", "loopback-insecure-false"])
@pytest.mark.usefixtures("lan")
def test_self_signed_https_registry_not_insecure_is_a_certificate_error(
    tls_registry: TLSRegistry, how: str
) -> None:
    port = tls_registry.server.port
    host = f"tls.lan:{port}" if how == "remote" else f"127.0.0.1:{port}"
    config = RegistryConfig(backoff_base=0.0, registries={host: RegistrySettings(host, False)})
    with (
        RegistryClient(config=config) as client,
        pytest.raises(RegistryError, match="certificate") as caught,
    ):
        client.get_manifest(_ref(host, tls_registry.repository, tls_registry.tag))
    assert not isinstance(caught.value, TransientError)  # not retried
    message = str(caught.value)
    assert "--certs-dir" in message and "--ca-bundle" in message
    assert f"--insecure-registry {host}" in message


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args], capture_output=True, text=True, timeout=120, env={**os.environ}
    )


def test_cli_exit_codes_over_self_signed_https(
    tls_registry: TLSRegistry, data_dir: Path, tmp_path: Path
) -> None:
    host = tls_registry.server.host
    image = f"{host}/{tls_registry.repository}:{tls_registry.tag}"
    conf = tmp_path / "registries.conf"
    conf.write_text(f'[[registry]]\nlocation = "{host}"\ninsecure = false\n')
    refused = _cli("pull", "--data-dir", str(data_dir), "--registries-conf", str(conf), image)
    assert refused.returncode == 1, refused.stderr  # RegistryError's code in the CLI's table
    assert "certificate" in refused.stderr and "--ca-bundle" in refused.stderr
    assert "insecure" in refused.stderr
    pulled = _cli("pull", "--data-dir", str(data_dir), "--json", image)  # loopback: insecure
    assert pulled.returncode == 0, pulled.stderr
    assert json.loads(pulled.stdout)["status"] == "ready"


@pytest.mark.parametrize("how", ["marked", "loopback"])
@pytest.mark.usefixtures("lan")
def test_plain_http_registry_marked_insecure_falls_back(
    alpine_ref: PushedImage, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    host, config = _insecure("plain", alpine_ref.registry.port, how)
    caplog.set_level(logging.INFO, logger="hypeman_images")
    with RegistryClient(config=config) as client:
        assert _pull(client, _ref(host, alpine_ref.repository, alpine_ref.tag)) == (
            alpine_ref.manifest_digest
        )
    assert f"{host}: insecure registry without TLS" in caplog.text
    assert "using plain HTTP" in caplog.text


@pytest.mark.usefixtures("lan")
def test_plain_http_registry_not_insecure_is_refused_clearly(alpine_ref: PushedImage) -> None:
    host = f"plain.lan:{alpine_ref.registry.port}"
    with (
        RegistryClient(config=FAST) as client,
        pytest.raises(RegistryError, match="does not speak TLS") as caught,
    ):
        client.get_manifest(_ref(host, alpine_ref.repository, alpine_ref.tag))
    assert not isinstance(caught.value, TransientError)
    assert f"--insecure-registry {host}" in str(caught.value)


def test_loopback_plain_http_probe_costs_one_failed_handshake(alpine_ref: PushedImage) -> None:
    host = alpine_ref.registry.host
    costs = []
    for _ in range(5):
        with RegistryClient(config=FAST) as client:
            started = time.perf_counter()
            assert client._schemes.scheme(host) == "http"
            costs.append(time.perf_counter() - started)
    costs.sort()
    print(
        f"loopback plain-HTTP probe: median {costs[2] * 1000:.1f} ms, max {costs[-1] * 1000:.1f} ms"
    )
    assert costs[2] < 0.1  # a refused TLS handshake, not a timeout


@pytest.mark.usefixtures("lan")
def test_registries_conf_insecure_entries(
    tls_registry: TLSRegistry, alpine_ref: PushedImage, tmp_path: Path
) -> None:
    tls_host = f"tls.lan:{tls_registry.server.port}"
    plain_host = f"plain.lan:{alpine_ref.registry.port}"
    conf = tmp_path / "registries.conf"
    conf.write_text(
        f'insecure-registries = ["{plain_host}"]\n'
        "[[registry]]\n"
        f'location = "{tls_host}"\n'
        "insecure = true\n"
    )
    config = RegistryConfig(backoff_base=0.0).with_registries_conf(conf)
    with RegistryClient(config=config) as client:
        ref = _ref(tls_host, tls_registry.repository, tls_registry.tag)
        assert _pull(client, ref) == tls_registry.manifest_digest
        ref = _ref(plain_host, alpine_ref.repository, alpine_ref.tag)
        assert _pull(client, ref) == alpine_ref.manifest_digest


@pytest.mark.parametrize("served", ["self-signed-https", "plain-http"])
@pytest.mark.usefixtures("lan")
def test_a_mirror_marked_insecure(
    tls_registry: TLSRegistry, alpine_ref: PushedImage, tmp_path: Path, served: str
) -> None:
    # The origin (port 1 of a *.lan name: refused) is never needed: the mirror has the image.
    if served == "self-signed-https":
        mirror, repository, tag = (
            f"tlsmirror.lan:{tls_registry.server.port}",
            "secure/alpine",
            "3.20.3",
        )
        digest = tls_registry.manifest_digest
    else:
        mirror, repository, tag = (
            f"mirror.lan:{alpine_ref.registry.port}",
            "library/alpine",
            "3.20.3",
        )
        digest = alpine_ref.manifest_digest
    conf = tmp_path / "registries.conf"
    conf.write_text(
        '[[registry]]\nlocation = "origin.lan:1"\n'
        f'[[registry.mirror]]\nlocation = "{mirror}"\ninsecure = true\n'
    )
    config = RegistryConfig(backoff_base=0.0).with_registries_conf(conf)
    assert config.mirrors_for("origin.lan:1") == (Mirror(mirror, insecure=True),)
    with RegistryClient(config=config) as client:
        assert _pull(client, _ref("origin.lan:1", repository, tag)) == digest
