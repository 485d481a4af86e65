"""Registries that want credentials, on 127.0.0.1: token auth (with its token server) and basic.

Token auth the way Docker Hub and ghcr.io do it: docker-registry 2.8 with
``auth: token`` trusts JWTs whose header carries the signing certificate
(``x5c``) chained to ``rootcertbundle`` (distribution's
``registry/auth/token/token.go``, ``VerifySigningKey``), issued by
:class:`TokenServer` as ``docs/spec/auth/jwt.md`` describes. Basic auth is
docker-registry's ``htpasswd`` (bcrypt entries made by apache2-utils' htpasswd).
"""

from __future__ import annotations

import base64
import datetime
import json
import secrets
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hypeman_images.oci.reference import Reference, parse_reference

from .images import Image, make_image, make_layer, push_image
from .registry import RegistryServer, self_signed_cert, start_registry

PUBLIC_REPO = "public/app"
PRIVATE_REPO = "private/app"
USERS = {"alice": "wonderland", "carol": "looking-glass", "dora": "Pw-tok-3f9c1d7e5a"}
# OAuth2 refresh tokens the token server knows (what `docker login` stores as identitytoken).
REFRESH_TOKENS = {"rt-alice-8d1f0c": "alice"}
SERVICE = "test-registry"
ISSUER = "test-token-issuer"


class TokenServer:
    """A distribution token server on 127.0.0.1: anonymous pulls of public repos,
    ``alice`` pulls of everything; counts the tokens it issues. Over HTTPS with
    ``tls`` (certificate, key).

    ``GET /token`` takes basic auth (``docs/spec/auth/token.md``); ``POST /token``
    takes the OAuth2 grants of ``docs/spec/auth/oauth.md``: ``refresh_token``
    (an identity token from ``REFRESH_TOKENS``) and ``password``, with
    ``service`` and ``client_id`` required, and answers ``access_token``.
    ``forms`` records each POST's form."""

    def __init__(
        self, tmp: Path, *, expires_in: int = 300, tls: tuple[Path, Path] | None = None
    ) -> None:
        self.expires_in = expires_in
        self.requests: list[tuple[str | None, str]] = []  # (user, scope)
        self.forms: list[dict[str, str]] = []
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test token signer")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.bundle = tmp / "token-root.pem"
        self.bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server._handle(self)

            def do_POST(self) -> None:
                server._handle_post(self)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
            scheme = "https"
        self.realm = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}/token"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def mint(self, access: Sequence[Mapping[str, object]], subject: str = "") -> str:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": subject,
            "aud": SERVICE,
            "exp": now + self.expires_in,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        x5c = [base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()]
        return jwt.encode(claims, self.key, algorithm="ES256", headers={"x5c": x5c})

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        query = parse_qs(urlsplit(handler.path).query)
        user = self._user(handler.headers.get("Authorization"))
        if user is False:
            handler.send_response(401)
            handler.end_headers()
            return
        assert isinstance(user, str)
        scope = query.get("scope", [""])[0]
        self.requests.append((user or None, scope))
        token = self._grant(user, scope)
        self._answer(handler, 200, {"token": token, "expires_in": self.expires_in})

    def _handle_post(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        form = {k: v[0] for k, v in parse_qs(handler.rfile.read(length).decode()).items()}
        self.forms.append(form)
        grant = form.get("grant_type")
        if not form.get("service") or not form.get("client_id"):
            # oauth.md: both are required.
            self._answer(handler, 400, {"error": "invalid_request"})
            return
        if grant == "refresh_token":
            user = REFRESH_TOKENS.get(form.get("refresh_token", ""))
        elif grant == "password":
            name = form.get("username", "")
            user = name if USERS.get(name) == form.get("password") else None
        else:
            self._answer(handler, 400, {"error": "unsupported_grant_type"})
            return
        if user is None:
            self._answer(handler, 401, {"error": "invalid_grant"})
            return
        scope = form.get("scope", "")
        self.requests.append((user, scope))
        token = self._grant(user, scope)
        answer = {"access_token": token, "scope": scope, "expires_in": self.expires_in}
        self._answer(handler, 200, answer)

    def _grant(self, user: str, scope: str) -> str:
        """A token for ``scope``'s repository: pull if ``user`` may, else no access."""
        access: list[dict[str, object]] = []
        kind, _, rest = scope.partition(":")
        repo, _, _actions = rest.rpartition(":")
        if kind == "repository" and (user or repo.startswith("public/")):
            access.append({"type": "repository", "name": repo, "actions": ["pull"]})
        return self.mint(access, user)

    @staticmethod
    def _answer(handler: BaseHTTPRequestHandler, status: int, doc: Mapping[str, object]) -> None:
        body = json.dumps(doc).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    @staticmethod
    def _user(header: str | None) -> str | bool:
        """The authenticated user, "" for anonymous, False for wrong credentials."""
        if not header:
            return ""
        user, _, password = base64.b64decode(header.removeprefix("Basic ")).decode().partition(":")
        return user if USERS.get(user) == password else False


@dataclass
class TokenRegistry:
    server: RegistryServer
    tokens: TokenServer
    public: Reference
    private: Reference

    def push(self, repository: str, tag: str, image: Image) -> str:
        """Push ``image`` as ``repository:tag`` with an admin token; return its digest."""
        admin = self.tokens.mint(
            [{"type": "repository", "name": repository, "actions": ["pull", "push"]}]
        )
        headers = {"Authorization": f"Bearer {admin}"}
        with httpx.Client(headers=headers, verify=False) as pusher:
            return push_image(self.server.url, repository, tag, image, client=pusher)


@contextmanager
def token_registry(tmp: Path, *, tls: bool = False) -> Iterator[TokenRegistry]:
    """A docker-registry with token auth and its :class:`TokenServer` (over HTTPS with
    ``tls``); ``public/app:v1`` and ``private/app:v1`` pushed (one raw 4 KiB layer)."""
    cert = self_signed_cert(tmp) if tls else None
    tokens = TokenServer(tmp, tls=cert)
    auth = {
        "token": {
            "realm": tokens.realm,
            "service": SERVICE,
            "issuer": ISSUER,
            "rootcertbundle": str(tokens.bundle),
        }
    }
    try:
        with start_registry(tmp, auth=auth, tls=cert) as server:
            admin = tokens.mint(
                [
                    {"type": "repository", "name": repo, "actions": ["pull", "push"]}
                    for repo in (PUBLIC_REPO, PRIVATE_REPO)
                ]
            )
            image = make_image([make_layer(b"\1" * 4096, "gzip")])
            headers = {"Authorization": f"Bearer {admin}"}
            with httpx.Client(headers=headers, verify=False) as pusher:
                for repo in (PUBLIC_REPO, PRIVATE_REPO):
                    push_image(server.url, repo, "v1", image, client=pusher)
            tokens.requests.clear()
            yield TokenRegistry(
                server,
                tokens,
                parse_reference(f"{server.host}/{PUBLIC_REPO}:v1"),
                parse_reference(f"{server.host}/{PRIVATE_REPO}:v1"),
            )
    finally:
        tokens.close()


@contextmanager
def basic_registry(tmp: Path, users: Mapping[str, str]) -> Iterator[RegistryServer]:
    """A docker-registry with htpasswd (basic) auth for ``users`` (name → password)."""
    htpasswd = tmp / "htpasswd"
    entries = [
        subprocess.run(
            ["htpasswd", "-Bbn", name, password], capture_output=True, text=True, check=True
        ).stdout.strip()
        for name, password in users.items()
    ]
    htpasswd.write_text("\n".join(entries) + "\n")
    auth = {"htpasswd": {"realm": "test realm", "path": str(htpasswd)}}
    with start_registry(tmp, auth=auth) as server:
        yield server
