"""The registry auth challenge as an ``httpx.Auth`` generator flow.

A request goes out with whatever this host accepted last time (a cached
bearer token for the same scope, or basic credentials). On ``401`` the
``WWW-Authenticate`` challenge (RFC 7235) decides:

* ``Bearer realm=…,service=…,scope=…`` — the distribution token protocol
  (``docs/spec/auth/token.md``): GET the realm with ``service`` and
  ``scope``, with basic credentials when there are some; or, holding an
  identity token, POST ``grant_type=refresh_token`` (``oauth.md``). The answer's
  ``token`` or ``access_token`` is cached per (host, scope) for its
  ``expires_in`` (60 s when absent) and the request is retried once.
* ``Basic realm=…`` — the request is retried once with the credentials.

A credential with a ``registry_token`` (docker's ``RegistryToken``, given
with an API request) is sent as ``Authorization: Bearer`` on the first try;
a 401 then stands, with no token exchange.

Credentials belong to the registry they were configured for. A ``401`` from
another origin (scheme, host, port) — the storage a blob GET was redirected
to — gets an anonymous token request only (its realm may be anywhere), and the
token is sent to that origin alone, as containerd and go-containerregistry
scope them (docs/security.md, "Credentials and redirects"). A URL the
registry hands out on another origin (a ``Location``, a ``Link``) is asked
with :meth:`RegistryAuth.anonymous` from the start.

The token request goes through ``send`` (the registry client's own
``httpx.Client``, so tests still swap one transport seam); it is not
yielded into httpx's flow because httpx reads every yielded response whole,
and a token answer is read here with a size cap. Refusals become :class:`Unauthorized`
naming the registry and where the credential came from, never the secret.
"""

from __future__ import annotations

import base64
import math
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass

import httpx

from hypeman_images.errors import HypemanError, RegistryError, Unauthorized
from hypeman_images.oci.wire import load_json
from hypeman_images.registry.credentials import Credential, CredentialSource
from hypeman_images.registry.responses import error_for, log_rate_limit, named_url

DEFAULT_TOKEN_LIFETIME = 60.0
# Renew a little early so a token does not expire between check and use.
_EXPIRY_MARGIN = 5.0
_MAX_TOKEN_BODY = 1024 * 1024
_CLIENT_ID = "hypeman-images"


@dataclass(frozen=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: a lower-cased scheme and its parameters."""

    scheme: str
    params: dict[str, str]


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a ``WWW-Authenticate`` value (RFC 7235 §4.1), quoted strings and all.

    ``Bearer realm="https://a/token",scope="repository:x:pull,push"`` keeps the
    comma inside the quotes; several challenges in one header are split.
    """
    parser = _ChallengeParser(header)
    return parser.parse()


class _ChallengeParser:
    _TOKEN_CHARS = frozenset(
        "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ/="
    )

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def parse(self) -> list[Challenge]:
        challenges: list[Challenge] = []
        while True:
            self._skip(" \t,")
            scheme = self._token(allow_equals=False)
            if not scheme:
                return challenges
            params: dict[str, str] = {}
            challenges.append(Challenge(scheme.lower(), params))
            while True:
                self._skip(" \t,")
                start = self.pos
                name = self._token(allow_equals=False)
                self._skip(" \t")
                if not name or not self._peek("="):
                    self.pos = start  # a token68 or the next challenge's scheme
                    break
                self.pos += 1
                self._skip(" \t")
                params[name.lower()] = self._quoted() if self._peek('"') else self._token(True)

    def _peek(self, char: str) -> bool:
        return self.text.startswith(char, self.pos)

    def _skip(self, chars: str) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in chars:
            self.pos += 1

    def _token(self, allow_equals: bool) -> str:
        start = self.pos
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char not in self._TOKEN_CHARS or (char == "=" and not allow_equals):
                break
            self.pos += 1
        return self.text[start : self.pos]

    def _quoted(self) -> str:
        self.pos += 1  # the opening quote
        out: list[str] = []
        while self.pos < len(self.text):
            char = self.text[self.pos]
            self.pos += 1
            if char == "\\" and self.pos < len(self.text):
                out.append(self.text[self.pos])
                self.pos += 1
            elif char == '"':
                break
            else:
                out.append(char)
        return "".join(out)


def pull_scope(repository: str) -> str:
    """The token scope for pulling ``repository`` (``token-scope.md``)."""
    return f"repository:{repository}:pull"


def push_scope(repository: str) -> str:
    """The token scope for pushing to ``repository``: a push reads back what it writes."""
    return f"repository:{repository}:pull,push"


class TokenCache:
    """Bearer tokens per (host, scope) until they expire, and each host's scheme.

    Shared by every request of one client; thread-safe.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}
        self._basic_hosts: set[str] = set()
        self._lock = threading.Lock()

    def token(self, host: str, scope: str) -> str | None:
        """A still-valid token for ``scope`` at ``host``."""
        with self._lock:
            found = self._tokens.get((host, scope))
            if found is None:
                return None
            token, expires = found
            if self._clock() >= expires:
                del self._tokens[(host, scope)]
                return None
            return token

    def put(self, host: str, scope: str, token: str, lifetime: float) -> None:
        with self._lock:
            expires = self._clock() + max(0.0, lifetime - _EXPIRY_MARGIN)
            self._tokens[(host, scope)] = (token, expires)

    def forget(self, host: str, scope: str) -> None:
        with self._lock:
            self._tokens.pop((host, scope), None)

    def uses_basic(self, host: str) -> bool:
        with self._lock:
            return host in self._basic_hosts

    def mark_basic(self, host: str) -> None:
        with self._lock:
            self._basic_hosts.add(host)


class RegistryAuth(httpx.Auth):
    """Auth for requests to one registry endpoint within one repository scope.

    ``registry`` is the name credentials are stored under (``docker.io``), which
    may differ from the API host the request goes to (``registry-1.docker.io``);
    ``repository`` is the scope's repository (``library/alpine``), so a
    credential stored for a namespace or repository applies ("" for none).
    """

    def __init__(
        self,
        *,
        registry: str,
        scope: str,
        credentials: CredentialSource | None,
        repository: str = "",
        cache: TokenCache,
        send: Callable[[httpx.Request], httpx.Response],
        registry_token: str = "",
    ) -> None:
        """``registry_token``: a bearer token to send as it is (module docstring)."""
        self.registry = registry
        self._registry_token = registry_token
        self._send = send
        self.scope = scope
        self.repository = repository
        self._credentials = credentials
        self._cache = cache
        self._credential: Credential | None = None
        self._looked_up = False

    def anonymous(self) -> RegistryAuth:
        """This auth without the registry's secrets: for a URL the registry handed out (an
        upload's ``Location``, a ``Link``) on another origin, as containerd drops its
        authorizer when a ``Location`` changes host or scheme (docs/security.md,
        "Credentials and redirects"). Anonymous tokens only, sent there alone."""
        return RegistryAuth(
            registry=self.registry, scope=self.scope, credentials=None,
            repository=self.repository, cache=self._cache, send=self._send,
        )  # fmt: skip

    def credential(self) -> Credential | None:
        """The credential for this registry and repository, looked up once per flow."""
        if not self._looked_up:
            source = self._credentials
            self._credential = source.get(self.registry, self.repository) if source else None
            self._looked_up = True
        return self._credential

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        if self._registry_token:
            request.headers["Authorization"] = f"Bearer {self._registry_token}"
            response = yield request
            if response.status_code == 401 and _origin(response.request.url) != _origin(
                request.url
            ):
                yield from self._foreign_flow(response)
            return  # the registry's own 401 stands: the client explains it
        host = request.url.netloc.decode("ascii")
        sent_cached = self._apply_cached(request, host)
        response = yield request
        if response.status_code == 401 and _origin(response.request.url) == _origin(request.url):
            response = yield from self._own_flow(request, response, host, sent_cached)
        if response.status_code == 401 and _origin(response.request.url) != _origin(request.url):
            # A redirect's target challenged: none of this registry's secrets go there.
            yield from self._foreign_flow(response)
        # Otherwise the 401 stands; the client explains it.

    def _own_flow(
        self, request: httpx.Request, response: httpx.Response, host: str, sent_cached: bool
    ) -> Generator[httpx.Request, httpx.Response, httpx.Response]:
        """Answer this registry's own challenge; the response to the retry, if any."""
        if sent_cached:
            self._cache.forget(host, self.scope)
        challenges = parse_challenges(", ".join(response.headers.get_list("WWW-Authenticate")))
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        basic = next((c for c in challenges if c.scheme == "basic"), None)
        if bearer is not None and "realm" in bearer.params:
            token, lifetime = self._fetch_token(bearer)
            self._cache.put(host, self.scope, token, lifetime)
            request.headers["Authorization"] = f"Bearer {token}"
            return (yield request)
        if basic is not None and self.credential() is not None and not sent_cached:
            self._cache.mark_basic(host)
            request.headers["Authorization"] = self._basic_header()
            return (yield request)
        return response

    def _foreign_flow(
        self, response: httpx.Response
    ) -> Generator[httpx.Request, httpx.Response, None]:
        """Answer another origin's bearer challenge with an anonymous token, sent there only."""
        challenges = parse_challenges(", ".join(response.headers.get_list("WWW-Authenticate")))
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        if bearer is None or "realm" not in bearer.params:
            return  # the 401 stands; the client explains it
        scope = bearer.params.get("scope", self.scope)
        token, _ = self._fetch_token(bearer, foreign_scope=scope)
        retry = response.request
        retry.headers["Authorization"] = f"Bearer {token}"
        yield retry

    def _apply_cached(self, request: httpx.Request, host: str) -> bool:
        token = self._cache.token(host, self.scope)
        if token is not None:
            request.headers["Authorization"] = f"Bearer {token}"
            return True
        if self._cache.uses_basic(host) and self.credential() is not None:
            request.headers["Authorization"] = self._basic_header()
            return True
        return False

    def _basic_header(self) -> str:
        credential = self.credential()
        assert credential is not None
        raw = f"{credential.username}:{credential.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def _token_request(
        self, challenge: Challenge, scope: str, credential: Credential | None
    ) -> httpx.Request:
        realm = named_url(challenge.params["realm"], f"the auth realm {self.registry} names")
        service = challenge.params.get("service", "")
        if credential is not None and credential.identity_token:
            form = {
                "grant_type": "refresh_token",
                "refresh_token": credential.identity_token,
                "service": service,
                "client_id": _CLIENT_ID,
            }
            if scope:
                form["scope"] = scope
            return httpx.Request("POST", realm, data=form)
        params = {k: v for k, v in (("scope", scope), ("service", service)) if v}
        headers = {}
        if credential is not None:
            headers["Authorization"] = self._basic_header()
            params["account"] = credential.username
        return httpx.Request("GET", realm, params=params, headers=headers)

    def _fetch_token(
        self, challenge: Challenge, *, foreign_scope: str | None = None
    ) -> tuple[str, float]:
        """A token from the challenge's realm, with this registry's credential; anonymous
        for ``foreign_scope``, the scope another origin's challenge asked for."""
        foreign = foreign_scope is not None
        scope = foreign_scope if foreign_scope is not None else self.scope
        request = self._token_request(challenge, scope, None if foreign else self.credential())
        realm_host = request.url.netloc.decode("ascii")
        response = self._send(request)
        try:
            log_rate_limit(response, realm_host)
            if response.status_code in (401, 403) and foreign:
                raise Unauthorized(
                    f"{self.registry}: its blob storage's token server {realm_host} refused "
                    f"anonymous access to {scope} (credentials are sent to the registry only)"
                )
            if response.status_code in (401, 403):
                raise self.refused(f"its token server {realm_host} refused")
            if response.status_code != 200:
                raise error_for(response, host=realm_host, subject=f"a token for {scope}")
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > _MAX_TOKEN_BODY:
                    raise RegistryError(f"token server {realm_host} sent an oversized answer")
        finally:
            response.close()
        try:
            doc = load_json(body)
            token = doc.get("token") or doc.get("access_token")
            expires_in = doc.get("expires_in") or DEFAULT_TOKEN_LIFETIME
        except (ValueError, AttributeError) as exc:
            raise RegistryError(f"token server {realm_host} sent malformed JSON") from exc
        if not isinstance(token, str) or not token:
            raise RegistryError(f"token server {realm_host} sent no token")
        lifetime = _seconds(expires_in)
        if lifetime is None:
            raise RegistryError(f"token server {realm_host} sent an expires_in that is no number")
        return token, lifetime

    def refused(self, what: str = "the registry refused") -> HypemanError:
        """The Unauthorized error for this registry, naming the credential's origin."""
        credential = self.credential()
        if credential is None:
            return Unauthorized(
                f"{self.registry}: {what} anonymous access to {_scope_name(self.scope)}; "
                f"the repository may not exist or may need credentials",
                hint=f"hypeman-images login {self.registry}",
                api_hint="give credentials in the request",
            )
        return Unauthorized(
            f"{self.registry}: {what} the credentials ({credential.describe()}) "
            f"for {_scope_name(self.scope)}",
            hint="check them or log in again",
            api_hint="check them",
        )


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    """RFC 6454 origin: scheme, host and port (the scheme's default when not given)."""
    return url.scheme, url.host, url.port or {"http": 80, "https": 443}.get(url.scheme)


def same_origin(url: str, other: str) -> bool:
    """Whether two absolute URLs share an origin (RFC 6454: scheme, host and port)."""
    return _origin(httpx.URL(url)) == _origin(httpx.URL(other))


def _seconds(value: object) -> float | None:
    """A token answer's ``expires_in`` (docker's token spec: an integer of seconds; 0 or
    absent is the default, taken before this), or None if it is not a number."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except OverflowError:  # an int of thousands of digits: as good as endless
        return math.inf
    return None if math.isnan(seconds) else seconds


def _scope_name(scope: str) -> str:
    if not scope:
        return "the registry"
    parts = scope.split(":")
    return f"repository {parts[1]}" if len(parts) == 3 and parts[0] == "repository" else scope
