"""The auth challenge flow: header parsing, and bearer/basic against mocks.

Real token and htpasswd registries are exercised in ``test_auth_registry`` below
(same file, further down); these first tests pin the protocol details with an
``httpx.MockTransport`` because they are about exact requests and headers.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from support.authregistries import (
    PRIVATE_REPO,
    PUBLIC_REPO,
    REFRESH_TOKENS,
    SERVICE,
    TokenRegistry,
)
from support.authregistries import basic_registry as basic_registry_at
from support.authregistries import token_registry as token_registry_at
from support.faultproxy import Fault, fault_proxy
from support.images import make_image, make_layer, push_image

from hypeman_images.errors import RateLimited, RegistryError, Unauthorized
from hypeman_images.oci.digest import Digest, VerifyingStream
from hypeman_images.oci.reference import Reference, parse_reference
from hypeman_images.oci.spec import (
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Manifest,
    parse_manifest_or_index,
)
from hypeman_images.registry.auth import Challenge, TokenCache, parse_challenges
from hypeman_images.registry.client import RegistryClient
from hypeman_images.registry.config import RegistryConfig
from hypeman_images.registry.credentials import (
    ChainedCredentials,
    Credential,
    StaticCredentials,
    default_credentials,
)
from hypeman_images.registry.login import login
from hypeman_images.registry.push import push_blob
from hypeman_images.registry.referrers import list_referrers

FAST = RegistryConfig(backoff_base=0.0, max_attempts=2)
MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST}).encode()


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        pytest.param(
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            'scope="repository:library/alpine:pull"',
            [
                Challenge(
                    "bearer",
                    {
                        "realm": "https://auth.docker.io/token",
                        "service": "registry.docker.io",
                        "scope": "repository:library/alpine:pull",
                    },
                )
            ],
            id="docker-hub",
        ),
        pytest.param(
            'Bearer realm="https://ghcr.io/token",scope="repository:a/b:pull,push",'
            'service="ghcr.io"',
            [
                Challenge(
                    "bearer",
                    {
                        "realm": "https://ghcr.io/token",
                        "scope": "repository:a/b:pull,push",
                        "service": "ghcr.io",
                    },
                )
            ],
            id="comma-in-quotes",
        ),
        pytest.param(
            'Basic realm="Registry Realm", Bearer realm="https://x/t" , service=x',
            [
                Challenge("basic", {"realm": "Registry Realm"}),
                Challenge("bearer", {"realm": "https://x/t", "service": "x"}),
            ],
            id="two-challenges-unquoted-value",
        ),
        pytest.param(
            'BEARER Realm = "a\\"b"',
            [Challenge("bearer", {"realm": 'a"b'})],
            id="case-spaces-escape",
        ),
        pytest.param("Negotiate", [Challenge("negotiate", {})], id="no-params"),
        pytest.param("", [], id="empty"),
    ],
)
def test_parse_challenges(header: str, expected: list[Challenge]) -> None:
    assert parse_challenges(header) == expected


class FakeRegistry:
    """A mock registry with a token server: counts token requests, checks tokens."""

    def __init__(self, *, lifetime: int | None = 300, user: tuple[str, str] | None = None) -> None:
        self.lifetime = lifetime
        self.user = user
        self.token_requests: list[httpx.Request] = []
        self.issued = 0
        self.valid: set[str] = set()

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example":
            return self._token(request)
        auth = request.headers.get("Authorization", "")
        if auth.removeprefix("Bearer ") not in self.valid:
            challenge = (
                'Bearer realm="https://auth.example/token",service="registry.example",'
                f'scope="repository:{request.url.path.split("/")[2]}:pull"'
            )
            return httpx.Response(401, headers={"WWW-Authenticate": challenge})
        return httpx.Response(200, content=MANIFEST, headers={"Content-Type": OCI_MANIFEST})

    def _token(self, request: httpx.Request) -> httpx.Response:
        self.token_requests.append(request)
        if self.user is not None:
            expected = "Basic " + base64.b64encode(":".join(self.user).encode()).decode()
            if request.headers.get("Authorization") != expected:
                return httpx.Response(401)
        self.issued += 1
        token = f"t{self.issued}"
        self.valid.add(token)
        body: dict[str, object] = {"access_token": token}
        if self.lifetime is not None:
            body["expires_in"] = self.lifetime
        return httpx.Response(200, json=body)


def _client(fake: FakeRegistry, credentials: StaticCredentials | None = None) -> RegistryClient:
    return RegistryClient(
        transport=httpx.MockTransport(fake.handler), credentials=credentials, config=FAST
    )


def test_bearer_token_fetched_once_and_reused() -> None:
    # A mock: exact request shapes are the subject; test_auth_registry uses a real one.
    fake = FakeRegistry()
    with _client(fake) as client:
        for _ in range(3):
            client.get_manifest(Reference("registry.example", "a/b", "t"))
    assert len(fake.token_requests) == 1
    params = fake.token_requests[0].url.params
    assert params["scope"] == "repository:a/b:pull"
    assert params["service"] == "registry.example"
    assert "Authorization" not in fake.token_requests[0].headers


def test_a_token_per_repository() -> None:
    fake = FakeRegistry()
    with _client(fake) as client:
        client.get_manifest(Reference("registry.example", "a/b", "t"))
        client.get_manifest(Reference("registry.example", "c/d", "t"))
        client.get_manifest(Reference("registry.example", "a/b", "u"))
    scopes = [r.url.params["scope"] for r in fake.token_requests]
    assert scopes == ["repository:a/b:pull", "repository:c/d:pull"]


def test_token_refreshed_after_expiry() -> None:
    now = [1000.0]
    fake = FakeRegistry(lifetime=None)  # the spec's default: 60 s
    with _client(fake) as client:
        client._tokens = TokenCache(clock=lambda: now[0])
        ref = Reference("registry.example", "a/b", "t")
        client.get_manifest(ref)
        now[0] += 30
        client.get_manifest(ref)
        assert len(fake.token_requests) == 1
        now[0] += 31
        client.get_manifest(ref)
    assert len(fake.token_requests) == 2


def test_basic_credentials_sent_to_the_token_server() -> None:
    fake = FakeRegistry(user=("alice", "s3cret"))
    credentials = StaticCredentials({"registry.example": Credential("alice", "s3cret", origin="t")})
    with _client(fake, credentials) as client:
        client.get_manifest(Reference("registry.example", "a/b", "t"))
    assert fake.token_requests[0].url.params["account"] == "alice"


def test_refused_token_is_unauthorized_naming_origin_not_secret() -> None:
    fake = FakeRegistry(user=("alice", "right"))
    credentials = StaticCredentials(
        {"registry.example": Credential("alice", "wrong-pw", origin="~/.docker/config.json")}
    )
    with _client(fake, credentials) as client, pytest.raises(Unauthorized) as caught:
        client.get_manifest(Reference("registry.example", "a/b", "t"))
    message = str(caught.value)
    assert "registry.example" in message
    assert "~/.docker/config.json" in message and "alice" in message
    assert "wrong-pw" not in message


def test_anonymous_refusal_suggests_login() -> None:
    fake = FakeRegistry(user=("alice", "right"))
    with _client(fake) as client, pytest.raises(Unauthorized, match=r"login registry\.example"):
        client.get_manifest(Reference("registry.example", "a/b", "t"))


def test_identity_token_uses_oauth_refresh_grant() -> None:
    seen: list[httpx.Request] = []
    fake = FakeRegistry()

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example":
            seen.append(request)
        return fake.handler(request)

    credentials = StaticCredentials(
        {"registry.example": Credential(identity_token="refresh-me", origin="t")}
    )
    with RegistryClient(
        transport=httpx.MockTransport(handler), credentials=credentials, config=FAST
    ) as client:
        client.get_manifest(Reference("registry.example", "a/b", "t"))
    assert seen[0].method == "POST"
    form = dict(x.split("=", 1) for x in seen[0].content.decode().split("&"))
    assert form["grant_type"] == "refresh_token" and form["refresh_token"] == "refresh-me"


def _basic_registry(user: str, password: str) -> Callable[[httpx.Request], httpx.Response]:
    expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def handler(request: httpx.Request) -> httpx.Response:
        if request.headers.get("Authorization") != expected:
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})
        return httpx.Response(200, content=MANIFEST)

    return handler


def test_basic_challenge_then_preemptive() -> None:
    sent: list[bool] = []
    inner = _basic_registry("bob", "pw")

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append("Authorization" in request.headers)  # the flow re-sends the same object
        return inner(request)

    credentials = StaticCredentials({"registry.example": Credential("bob", "pw", origin="t")})
    with RegistryClient(
        transport=httpx.MockTransport(handler), credentials=credentials, config=FAST
    ) as client:
        client.get_manifest(Reference("registry.example", "a/b", "t"))
        client.get_manifest(Reference("registry.example", "a/b", "t"))
    assert sent == [False, True, True]


def _token_server(answer: httpx.Response) -> httpx.MockTransport:
    """A registry whose challenges send clients to auth.example, which answers ``answer``."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example":
            return answer
        return httpx.Response(
            401, headers={"WWW-Authenticate": 'Bearer realm="https://auth.example/token"'}
        )

    return httpx.MockTransport(handler)


def test_token_server_429_is_rate_limited() -> None:
    with (
        RegistryClient(
            transport=_token_server(httpx.Response(429, headers={"Retry-After": "7"})), config=FAST
        ) as client,
        pytest.raises(RateLimited, match="retry after 7 s"),
    ):
        client.get_manifest(Reference("registry.example", "a/b", "t"))


@pytest.mark.parametrize(
    "lifetime", [b"[300]", b'"300"', b"NaN", b"true"], ids=["list", "string", "nan", "bool"]
)
def test_a_token_whose_lifetime_is_no_number_is_refused(lifetime: bytes) -> None:
    # A mock token server: docker's token spec makes expires_in an integer of seconds.
    answer = httpx.Response(200, content=b'{"token":"t","expires_in":' + lifetime + b"}")
    with (
        RegistryClient(transport=_token_server(answer), config=FAST) as client,
        pytest.raises(RegistryError, match="expires_in"),
    ):
        client.get_manifest(Reference("registry.example", "a/b", "t"))


def test_an_auth_realm_that_is_no_url_is_a_registry_error() -> None:
    # A mock registry: docker-registry's challenge names the realm it is configured with.
    def handler(request: httpx.Request) -> httpx.Response:
        challenge = 'Bearer realm="http://[::1/token",service="registry.example"'
        return httpx.Response(401, headers={"WWW-Authenticate": challenge})

    with (
        RegistryClient(transport=httpx.MockTransport(handler), config=FAST) as client,
        pytest.raises(RegistryError, match=r"auth realm registry\.example names .* not a URL"),
    ):
        client.get_manifest(Reference("registry.example", "a/b", "t"))


def test_a_token_of_an_endless_lifetime_is_kept() -> None:
    # 4300 digits, the most json reads, overflow a float: the token never expires here.
    fake = FakeRegistry(lifetime=10**4299)
    with _client(fake) as client:
        for _ in range(2):
            client.get_manifest(Reference("registry.example", "a/b", "t"))
    assert len(fake.token_requests) == 1


# -- against a real docker-registry (support.authregistries) ------------------------------


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenRegistry]:
    with token_registry_at(tmp_path_factory.mktemp("token-registry")) as registry:
        yield registry


@pytest.fixture(scope="module")
def https_token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenRegistry]:
    """The same over HTTPS (registry and token server) with a self-signed certificate."""
    with token_registry_at(tmp_path_factory.mktemp("https-token-registry"), tls=True) as registry:
        yield registry


def _pull(client: RegistryClient, ref: Reference) -> None:
    """Manifest and every blob, verified."""
    fetched = client.get_manifest(ref)
    manifest = parse_manifest_or_index(fetched.data, fetched.media_type)
    assert isinstance(manifest, Manifest)
    for descriptor in (manifest.config, *manifest.layers):
        with client.open_blob(ref, descriptor) as chunks:
            stream = VerifyingStream(chunks, descriptor.digest, descriptor.size)
            for _ in stream:
                pass
        stream.verify()


def _docker_config(tmp_path: Path, registry: str, user: str, password: str) -> ChainedCredentials:
    login(registry, user, password, config_path=tmp_path / "config.json")
    return default_credentials({"DOCKER_CONFIG": str(tmp_path)})


def test_anonymous_pull_of_a_public_repository(token_registry: TokenRegistry) -> None:
    token_registry.tokens.requests.clear()
    with RegistryClient(config=FAST) as client:
        _pull(client, token_registry.public)
    # One token for the manifest and both blobs: same scope, reused.
    assert token_registry.tokens.requests == [(None, f"repository:{PUBLIC_REPO}:pull")]


def test_anonymous_pull_of_a_private_repository_is_unauthorized(
    token_registry: TokenRegistry,
) -> None:
    with RegistryClient(config=FAST) as client, pytest.raises(Unauthorized) as caught:
        client.get_manifest(token_registry.private)
    assert token_registry.server.host in str(caught.value)
    assert PRIVATE_REPO in str(caught.value)


def test_a_borrowing_view_keeps_its_credentials_and_tokens_to_itself(
    token_registry: TokenRegistry,
) -> None:
    """An API request's credentials (``RegistryClient.borrowing``): its tokens are its own."""
    host = token_registry.server.host
    token_registry.tokens.requests.clear()
    with RegistryClient(config=FAST) as client:
        borrowed = client.borrowing(host, Credential("alice", "wonderland", borrowed=True))
        _pull(borrowed, token_registry.private)
        borrowed.close()  # a view: the parent's connections stay open
        with pytest.raises(Unauthorized) as caught:
            client.get_manifest(token_registry.private)  # the view's token is not reused
        assert "anonymous" in str(caught.value)
        # Refused, a borrowed credential is named as such, never by its user.
        wrong = client.borrowing(host, Credential("alice", "Pw-9d2c", borrowed=True))
        with pytest.raises(Unauthorized) as refused:
            wrong.get_manifest(token_registry.private)
        assert "credentials given with the request" in refused.value.message
        assert "alice" not in refused.value.message and "Pw-9d2c" not in refused.value.message
        # Only for its registry: another host gets the parent's (none here).
        other = client.borrowing("elsewhere.example", Credential("alice", "wonderland"))
        with pytest.raises(Unauthorized):
            other.get_manifest(token_registry.private)
    assert token_registry.tokens.requests == [
        ("alice", f"repository:{PRIVATE_REPO}:pull"),
        (None, f"repository:{PRIVATE_REPO}:pull"),
        (None, f"repository:{PRIVATE_REPO}:pull"),
    ]


def test_a_registry_token_is_sent_as_it_is(token_registry: TokenRegistry) -> None:
    """docker's ``RegistryToken``: a bearer token for the registry, no token exchange."""
    tokens = token_registry.tokens
    minted = tokens.mint([{"type": "repository", "name": PRIVATE_REPO, "actions": ["pull"]}])
    tokens.requests.clear()
    with RegistryClient(config=FAST) as client:
        borrowed = client.borrowing(
            token_registry.server.host, Credential(registry_token=minted, borrowed=True)
        )
        _pull(borrowed, token_registry.private)
        stale = client.borrowing(
            token_registry.server.host, Credential(registry_token="not-a-jwt", borrowed=True)
        )
        with pytest.raises(Unauthorized, match="credentials given with the request"):
            stale.get_manifest(token_registry.private)
    assert tokens.requests == []


@pytest.mark.parametrize("over", ["http", "https-insecure"])
def test_credentialed_pull_of_a_private_repository(
    over: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    fixture = "token_registry" if over == "http" else "https_token_registry"
    registry: TokenRegistry = request.getfixturevalue(fixture)
    host = registry.server.host
    config = FAST
    if over == "https-insecure":
        # Neither certificate is trusted: the registry is marked insecure, and the
        # realm is on loopback (insecure by default), so neither is verified.
        assert registry.tokens.realm.startswith("https://127.0.0.1:")
        config = replace(FAST, insecure_registries=frozenset({host}))
    credentials = _docker_config(tmp_path, host, "alice", "wonderland")
    registry.tokens.requests.clear()
    with RegistryClient(credentials=credentials, config=config) as client:
        _pull(client, registry.private)
        _pull(client, registry.public)
    assert registry.tokens.requests == [
        ("alice", f"repository:{PRIVATE_REPO}:pull"),
        ("alice", f"repository:{PUBLIC_REPO}:pull"),
    ]


def _identity_config(tmp_path: Path, registry: str, token: str) -> ChainedCredentials:
    """A docker config.json as ``docker login`` writes one for an OAuth2 identity."""
    entry = {"auth": base64.b64encode(b"alice:").decode(), "identitytoken": token}
    (tmp_path / "config.json").write_text(json.dumps({"auths": {registry: entry}}))
    return default_credentials({"DOCKER_CONFIG": str(tmp_path)})


def test_credentialed_pull_with_an_identity_token(
    token_registry: TokenRegistry, tmp_path: Path
) -> None:
    host = token_registry.server.host
    (refresh_token,) = REFRESH_TOKENS
    credentials = _identity_config(tmp_path, host, refresh_token)
    tokens = token_registry.tokens
    tokens.requests.clear()
    tokens.forms.clear()
    with RegistryClient(credentials=credentials, config=FAST) as client:
        _pull(client, token_registry.private)
    # One POST (oauth.md's refresh_token grant), its access token reused for every blob.
    assert tokens.forms == [
        {
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "service": SERVICE,
            "scope": f"repository:{PRIVATE_REPO}:pull",
            "client_id": tokens.forms[0]["client_id"],
        }
    ]
    assert tokens.forms[0]["client_id"]  # required by the spec; any name will do
    assert tokens.requests == [("alice", f"repository:{PRIVATE_REPO}:pull")]


def test_a_refused_identity_token_names_its_origin_not_the_token(
    token_registry: TokenRegistry, tmp_path: Path
) -> None:
    host = token_registry.server.host
    credentials = _identity_config(tmp_path, host, "rt-revoked-77aa")
    with (
        RegistryClient(credentials=credentials, config=FAST) as client,
        pytest.raises(Unauthorized) as caught,
    ):
        client.get_manifest(token_registry.private)
    message = str(caught.value)
    assert f"its token server {urlsplit(token_registry.tokens.realm).netloc} refused" in message
    assert f'{tmp_path / "config.json"} entry "{host}"' in message
    assert "rt-revoked-77aa" not in message


def test_wrong_password_names_registry_and_origin(
    token_registry: TokenRegistry, tmp_path: Path
) -> None:
    credentials = _docker_config(tmp_path, token_registry.server.host, "alice", "not-it-123")
    with (
        RegistryClient(credentials=credentials, config=FAST) as client,
        pytest.raises(Unauthorized) as caught,
    ):
        client.get_manifest(token_registry.private)
    message = str(caught.value)
    assert token_registry.server.host in message
    assert f'{tmp_path / "config.json"} entry "{token_registry.server.host}"' in message
    assert "alice" in message
    assert "not-it-123" not in message


# -- credentials per namespace or repository (containers-auth.json(5)) ---------------------


def _auth_json(tmp_path: Path, auths: Mapping[str, tuple[str, str]]) -> ChainedCredentials:
    """podman's ``$REGISTRY_AUTH_FILE`` with ``auths`` (key → user, password); no docker config."""
    entries = {
        key: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}
        for key, (user, password) in auths.items()
    }
    path = tmp_path / "auth.json"
    path.write_text(json.dumps({"auths": entries}))
    return default_credentials(
        {"REGISTRY_AUTH_FILE": str(path), "DOCKER_CONFIG": str(tmp_path / "no-docker")}
    )


@pytest.mark.parametrize(
    ("keys", "users"),
    [
        (
            {
                "": ("mallory", "Wrong-host-pw"),  # refused by the token server if ever sent
                "/private": ("alice", "wonderland"),
                "/public/app": ("carol", "looking-glass"),
            },
            ("alice", "carol"),
        ),
        (
            # "host/privat" must not apply to "host/private/app" (as "quay.io/team"
            # to "quay.io/teamx/app"): the host-level key answers instead.
            {
                "": ("carol", "looking-glass"),
                "/privat": ("mallory", "Wrong-ns-pw"),
                "/pub": ("mallory", "Wrong-ns-pw"),
                "/private/ap": ("mallory", "Wrong-repo-pw"),
            },
            ("carol", "carol"),
        ),
    ],
    ids=["most-specific-key-wins", "keys-match-whole-components"],
)
def test_each_repository_gets_its_namespaced_credential(
    keys: dict[str, tuple[str, str]],
    users: tuple[str, str],
    token_registry: TokenRegistry,
    tmp_path: Path,
) -> None:
    host = token_registry.server.host
    credentials = _auth_json(tmp_path, {host + suffix: user for suffix, user in keys.items()})
    token_registry.tokens.requests.clear()
    with RegistryClient(credentials=credentials, config=FAST) as client:
        _pull(client, token_registry.private)
        _pull(client, token_registry.public)
    assert token_registry.tokens.requests == [
        (users[0], f"repository:{PRIVATE_REPO}:pull"),
        (users[1], f"repository:{PUBLIC_REPO}:pull"),
    ]


def test_a_refused_namespaced_credential_names_its_key(
    token_registry: TokenRegistry, tmp_path: Path
) -> None:
    host = token_registry.server.host
    credentials = _auth_json(
        tmp_path,
        {host: ("alice", "wonderland"), f"{host}/private": ("alice", "Stale-pw-42")},
    )
    with RegistryClient(credentials=credentials, config=FAST) as client:
        with pytest.raises(Unauthorized) as caught:
            client.get_manifest(token_registry.private)
        client.get_manifest(token_registry.public)  # the host key still serves public/app
    message = str(caught.value)
    assert f'auth.json entry "{host}/private"' in message and "alice" in message
    assert "Stale-pw-42" not in message


def test_token_reused_until_expiry_then_refreshed(token_registry: TokenRegistry) -> None:
    now = [0.0]
    token_registry.tokens.requests.clear()
    with RegistryClient(config=FAST) as client:
        client._tokens = TokenCache(clock=lambda: now[0])
        client.get_manifest(token_registry.public)
        now[0] += token_registry.tokens.expires_in / 2
        client.get_manifest(token_registry.public)
        assert len(token_registry.tokens.requests) == 1
        now[0] += token_registry.tokens.expires_in
        client.get_manifest(token_registry.public)
    assert len(token_registry.tokens.requests) == 2


# -- basic auth (htpasswd) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reference]:
    tmp = tmp_path_factory.mktemp("basic-registry")
    with basic_registry_at(tmp, {"bob": "builder"}) as server:
        image = make_image([make_layer(b"\2" * 4096, "gzip")])
        with httpx.Client(auth=("bob", "builder")) as pusher:
            push_image(server.url, "team/app", "v1", image, client=pusher)
        yield parse_reference(f"{server.host}/team/app:v1")


def test_basic_auth_pull(basic_registry: Reference, tmp_path: Path) -> None:
    credentials = _docker_config(tmp_path, basic_registry.registry, "bob", "builder")
    with RegistryClient(credentials=credentials, config=FAST) as client:
        _pull(client, basic_registry)


@pytest.mark.parametrize("password", [None, "Pw-7f3k9"], ids=["anonymous", "wrong-password"])
def test_basic_auth_refused(
    basic_registry: Reference, tmp_path: Path, password: str | None
) -> None:
    credentials = (
        _docker_config(tmp_path, basic_registry.registry, "bob", password) if password else None
    )
    with (
        RegistryClient(credentials=credentials, config=FAST) as client,
        pytest.raises(Unauthorized, match=re.escape(basic_registry.registry)) as caught,
    ):
        client.get_manifest(basic_registry)
    assert "Pw-7f3k9" not in str(caught.value)


# -- checking a login ----------------------------------------------------------------------


def test_check_login_against_a_token_registry(token_registry: TokenRegistry) -> None:
    host = token_registry.server.host
    with RegistryClient(config=FAST) as client:
        client.check_login(host, Credential("alice", "wonderland", origin="hypeman-images login"))
        with pytest.raises(Unauthorized, match=re.escape(host)) as caught:
            client.check_login(host, Credential("alice", "Pw-0x9q", origin="hypeman-images login"))
    assert "Pw-0x9q" not in str(caught.value)


def test_check_login_against_a_basic_registry(basic_registry: Reference) -> None:
    host = basic_registry.registry
    with RegistryClient(config=FAST) as client:
        client.check_login(host, Credential("bob", "builder", origin="flag"))
        with pytest.raises(Unauthorized):
            client.check_login(host, Credential("bob", "nope", origin="flag"))


# -- credentials stay with the registry they were configured for ---------------------


class _Recorder(BaseHTTPRequestHandler):
    """A tiny server on 127.0.0.1 whose answers come from ``answer`` and whose requests
    are recorded as (path, Authorization header)."""

    answer: Callable[[_Recorder], tuple[int, dict[str, str], bytes]]
    seen: list[tuple[str, str | None]]

    def do_GET(self) -> None:
        self.seen.append((self.path, self.headers.get("Authorization")))
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, headers, body = self.answer()
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    do_PUT = do_GET

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def _recording_server(
    answer: Callable[[_Recorder], tuple[int, dict[str, str], bytes]],
) -> Iterator[tuple[str, list[tuple[str, str | None]]]]:
    seen: list[tuple[str, str | None]] = []
    handler = type("Handler", (_Recorder,), {"answer": answer, "seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("realm_host", ["third", "registry"])
def test_credentials_do_not_follow_a_redirect_to_another_hosts_token_realm(
    realm_host: str,
) -> None:
    # Registry A (basic auth) redirects a blob GET to storage B; B challenges with a
    # bearer realm on C (or on A itself). A's password belongs to A: C must never see
    # it, and the public blob must still arrive through C's anonymous token.
    blob = secrets.token_bytes(3000)
    descriptor = Descriptor("application/octet-stream", Digest.of(blob), len(blob))
    password = "A-only-" + secrets.token_hex(4)
    basic = "Basic " + base64.b64encode(f"bob:{password}".encode()).decode()
    hosts: dict[str, str] = {}

    def registry(req: _Recorder) -> tuple[int, dict[str, str], bytes]:
        if req.path.startswith("/token"):
            return 200, {"Content-Type": "application/json"}, b'{"token": "anon-token"}'
        if req.headers.get("Authorization") != basic:
            return 401, {"WWW-Authenticate": 'Basic realm="a"'}, b""
        return 307, {"Location": f"http://{hosts['storage']}/blob"}, b""

    def storage(req: _Recorder) -> tuple[int, dict[str, str], bytes]:
        if req.headers.get("Authorization") == "Bearer anon-token":
            return 200, {}, blob
        realm = f"http://{hosts[realm_host]}/token"
        challenge = f'Bearer realm="{realm}",service="storage",scope="blob:read"'
        return 401, {"WWW-Authenticate": challenge}, b""

    def token(req: _Recorder) -> tuple[int, dict[str, str], bytes]:
        return 200, {"Content-Type": "application/json"}, b'{"token": "anon-token"}'

    with (
        _recording_server(registry) as (hosts["registry"], at_registry),
        _recording_server(storage) as (hosts["storage"], at_storage),
        _recording_server(token) as (hosts["third"], at_third),
    ):
        credentials = StaticCredentials(
            {hosts["registry"]: Credential("bob", password, origin="t")}
        )
        ref = Reference(hosts["registry"], "team/app", "v1")
        # Twice: the second GET sends the basic credentials up front, as they worked.
        with RegistryClient(credentials=credentials, config=FAST) as client:
            got = [_blob_or_refusal(client, ref, descriptor) for _ in range(2)]
    token_requests = at_third + [r for r in at_registry if r[0].startswith("/token")]
    assert token_requests, "the storage's realm was asked for a token"
    assert all(auth is None for _, auth in token_requests), token_requests
    assert all(auth in (None, "Bearer anon-token") for _, auth in at_storage), at_storage
    assert any(auth == basic for _, auth in at_registry), "A got its own credentials"
    assert got == [blob, blob]


def _blob_or_refusal(client: RegistryClient, ref: Reference, descriptor: Descriptor) -> bytes:
    """The verified blob, or b"" if refused (the test checks where credentials went first)."""
    try:
        with client.open_blob(ref, descriptor) as chunks:
            stream = VerifyingStream(chunks, descriptor.digest, descriptor.size)
            data = b"".join(stream)
        stream.verify()
    except Unauthorized:
        return b""
    return data


def _bob_at(host: str) -> StaticCredentials:
    return StaticCredentials({host: Credential("bob", "builder", origin="t")})


def _challenging(req: _Recorder) -> tuple[int, dict[str, str], bytes]:
    """Another origin that asks for basic credentials, as a thief would."""
    if req.headers.get("Authorization"):
        return 201, {}, b""
    return 401, {"WWW-Authenticate": 'Basic realm="elsewhere"'}, b""


def test_an_upload_location_on_another_origin_gets_no_credentials(
    basic_registry: Reference,
) -> None:
    # The real registry, behind the fault proxy, which answers the upload's POST with a
    # Location on another server (containerd drops its authorizer there too).
    blob = secrets.token_bytes(1000)
    with (
        _recording_server(_challenging) as (elsewhere, seen),
        fault_proxy(f"http://{basic_registry.registry}") as proxy,
    ):
        location = {"Location": f"http://{elsewhere}/v2/team/app/blobs/uploads/x?_state=y"}
        proxy.add(Fault("/blobs/uploads/", "replace", method="POST", status=202, headers=location))
        repo = replace(basic_registry, registry=proxy.host)
        with (
            RegistryClient(credentials=_bob_at(proxy.host), config=FAST) as client,
            pytest.raises(Unauthorized, match=f"{elsewhere}, which refused it") as caught,
        ):
            push_blob(client, repo, Digest.of(blob), blob)
        said = proxy.requests("/blobs/uploads/", "POST")
    assert said and seen, "the POST went to the registry, the PUT elsewhere"
    assert all(auth is None for _, auth in seen), seen
    assert "builder" not in str(caught.value)


def test_a_referrers_link_to_another_origin_gets_no_credentials(
    basic_registry: Reference,
) -> None:
    # The registry's referrers answer (served by the proxy: distribution 2.8 has no such
    # API) links its next page to another server, which asks for credentials.
    subject = Digest.of(b"subject")
    with (
        _recording_server(_challenging) as (elsewhere, seen),
        fault_proxy(f"http://{basic_registry.registry}") as proxy,
    ):
        page = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()
        link = f'<http://{elsewhere}/v2/team/app/referrers/{subject}?n=2>; rel="next"'
        headers = {"Content-Type": OCI_INDEX, "Link": link}
        proxy.add(Fault("/referrers/", "replace", status=200, body=page, headers=headers))
        repo = replace(basic_registry, registry=proxy.host)
        with (
            RegistryClient(credentials=_bob_at(proxy.host), config=FAST) as client,
            pytest.raises(Unauthorized, match=f"{elsewhere}, which refused it"),
        ):
            list_referrers(client, repo, subject)
    assert seen and all(auth is None for _, auth in seen), seen
