"""Where registry credentials come from (``login``/``logout`` store them: :mod:`.login`).

A :class:`CredentialSource` answers one question, "what credential do I have
for this repository of this registry?", and says where the answer came from
(the file and the ``auths`` key that matched) so an error can name it, never
the secret. The sources follow the files other tools write:

* docker's ``config.json`` (``$DOCKER_CONFIG/config.json``, else
  ``~/.docker/config.json``): ``auths`` entries (base64 ``auth`` or
  ``username``/``password``, ``identitytoken``), ``credHelpers`` per registry
  and a default ``credsStore``, both run as ``docker-credential-<name> get``;
* podman/skopeo's ``auth.json`` (``$REGISTRY_AUTH_FILE``, else
  ``${XDG_RUNTIME_DIR}/containers/auth.json``), which has the same format.

:func:`default_credentials` chains them in the order podman reads them; the
first file with any matching entry answers (containers/image's
``pkg/docker/config``: the files are read in sequence until one has a
credential).

``auths`` keys are matched in two ways, by the file's kind (:func:`matching_keys`):

* podman's ``auth.json`` (containers-auth.json(5)): a key may name a namespace
  or repository (``quay.io/team``, ``quay.io/team/app``). For
  ``quay.io/team/app`` the keys ``quay.io/team/app``, ``quay.io/team`` and
  ``quay.io`` are tried in that order, each compared whole, so
  ``quay.io/team`` never matches ``quay.io/teamx/app``. Docker Hub's names
  are ``docker.io/library/alpine``. Then, as a host-level fallback, keys
  with a scheme lose their path (``https://index.docker.io/v1/`` is Docker
  Hub); a key without a scheme but with a path is a namespace, never a host.
* docker's ``config.json``: host keys only, as docker's ``fileStore.Get``:
  the exact server address first (``https://index.docker.io/v1/`` for Docker
  Hub), then any key whose host (``ConvertToHostname``: scheme and path
  dropped) is the registry.

``credHelpers`` and ``credsStore`` are per registry host in both.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import subprocess
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from hypeman_images.errors import InvalidArgument
from hypeman_images.oci.wire import load_json

log = logging.getLogger(__name__)

DOCKER_HUB = "docker.io"
# The key docker writes for Docker Hub, and what its credential helpers expect.
DOCKER_HUB_KEY = "https://index.docker.io/v1/"
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
# docker-credential-helpers' protocol signals "no entry" with this exact message
# (credentials.errCredentialsNotFoundMessage); it is the protocol, not a guess.
_HELPER_NOT_FOUND = "credentials not found in native keychain"
_HELPER_TIMEOUT = 30.0
# A credential helper answers "<token>" as the user name when Secret is an identity token.
_IDENTITY_TOKEN_USER = "<token>"


@dataclass(frozen=True)
class Credential:
    """A user name and password, an OAuth2 identity (refresh) token, or a bearer token.

    ``origin`` says where it came from ("~/.docker/config.json",
    "docker-credential-pass"); ``repr`` hides the secrets. ``registry_token``
    is sent to the registry as ``Authorization: Bearer`` as it is (docker's
    ``AuthConfig.RegistryToken``), with no token exchange. ``borrowed``: given
    with one API request (:class:`BorrowedCredentials`), so never named in a
    message, not even by its user name.
    """

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    origin: str = ""
    registry_token: str = field(default="", repr=False)
    borrowed: bool = False

    def describe(self) -> str:
        """Who and where from, for error messages: never the secret."""
        if self.borrowed:
            return "the credentials given with the request"
        who = f"user {self.username!r}" if self.username else "an identity token"
        return f"{who} from {self.origin}" if self.origin else who

    @property
    def empty(self) -> bool:
        """No secret and no user: hypeman's "omitted or empty" credentials."""
        return not (self.username or self.password or self.identity_token or self.registry_token)


class CredentialSource(Protocol):
    """Something that may hold a credential for a registry host (``host[:port]``),
    or for one of its namespaces or repositories."""

    def get(self, registry: str, repository: str = "") -> Credential | None:
        """The credential for ``repository`` (``library/alpine``; "" for the
        registry as a whole) on ``registry`` (as in a Reference: ``docker.io``),
        or None."""
        ...


def registry_key(key: str) -> str:
    """Normalise a config key to a registry name, as docker's ``ConvertToHostname``.

    ``https://index.docker.io/v1/`` → ``docker.io``; ``http://host:5000/x`` → ``host:5000``.
    """
    host = key.removeprefix("http://").removeprefix("https://").split("/", 1)[0]
    return DOCKER_HUB if host in _HUB_ALIASES else host


def helper_server_url(registry: str) -> str:
    """The server URL credential helpers are asked about for ``registry``."""
    return DOCKER_HUB_KEY if registry_key(registry) == DOCKER_HUB else registry


def lookup_order(registry: str, repository: str = "") -> list[str]:
    """The ``auth.json`` keys that apply to ``registry/repository``, most specific first.

    ``("quay.io", "team/app")`` → ``quay.io/team/app``, ``quay.io/team``,
    ``quay.io`` (containers-auth.json(5); containers/image's ``authKeysForKey``).
    """
    parts = [registry_key(registry), *(p for p in repository.split("/") if p)]
    return ["/".join(parts[:n]) for n in range(len(parts), 0, -1)]


def _auth_json_host(key: str) -> str | None:
    """The registry an ``auth.json`` key names as a whole, or None for a namespace key.

    Only a key with a scheme loses its path (``https://index.docker.io/v1/``);
    ``quay.io/team`` names a namespace, not ``quay.io``.
    """
    if "://" not in key and "/" in key:
        return None
    return registry_key(key)


def matching_keys(
    keys: Iterable[str], registry: str, repository: str = "", *, namespaced: bool = True
) -> list[str]:
    """The ``auths`` keys that apply to ``repository`` on ``registry``, best first.

    ``namespaced`` is podman's ``auth.json`` (a key may name a namespace or
    repository, matched by whole path components, the longest first); without
    it, docker's ``config.json`` (host keys only; a path in a key is ignored,
    as docker's ``ConvertToHostname`` ignores it). In both, an exact key comes
    before one that only normalises to the registry.
    """
    keys = list(keys)
    present = set(keys)
    host = registry_key(registry)
    if namespaced:
        exact = [k for k in lookup_order(host, repository) if k in present]
        loose = [k for k in keys if k not in exact and _auth_json_host(k) == host]
    else:
        wanted = helper_server_url(host)
        exact = [wanted] if wanted in present else []
        loose = [k for k in keys if k != wanted and registry_key(k) == host]
    return exact + loose


def display_path(path: Path) -> str:
    """``path`` as messages show it: under the home directory as ``~/...``."""
    home = Path.home()
    with contextlib.suppress(ValueError):
        return "~/" + str(path.relative_to(home))
    return str(path)


class StaticCredentials:
    """A fixed map of key → credential (flags, tests, the API).

    Keys are matched as ``auth.json`` keys: a registry (``ghcr.io``), or a
    namespace or repository in one (``ghcr.io/org``).
    """

    def __init__(self, entries: Mapping[str, Credential]) -> None:
        self._entries = dict(entries)

    def get(self, registry: str, repository: str = "") -> Credential | None:
        found = matching_keys(self._entries, registry, repository)
        return self._entries[found[0]] if found else None


class BorrowedCredentials:
    """One request's credential for one registry, in memory only; others ask ``fallback``.

    hypeman's ``PushCredentials``: "borrowed for one image pull ... never
    persisted or logged". A registry client made with it
    (:meth:`RegistryClient.borrowing`) lives as long as that one build, and
    nothing else sees it.
    """

    def __init__(
        self, registry: str, credential: Credential, fallback: CredentialSource | None = None
    ) -> None:
        self.registry = registry_key(registry)
        self.credential = credential
        self._fallback = fallback

    def get(self, registry: str, repository: str = "") -> Credential | None:
        if registry_key(registry) == self.registry:
            return self.credential
        return self._fallback.get(registry, repository) if self._fallback else None


class CredentialHelper:
    """A ``docker-credential-<name>`` program on PATH (the docker helper protocol)."""

    def __init__(self, name: str, *, env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.program = f"docker-credential-{name}"
        self._env = dict(env) if env is not None else None

    def get(self, registry: str, repository: str = "") -> Credential | None:
        """Ask the helper about ``registry``; helpers know hosts, not repositories."""
        out = self._run("get", helper_server_url(registry), missing_ok=True)
        if out is None:
            return None
        try:
            doc = load_json(out)
            username, secret = str(doc.get("Username", "")), str(doc["Secret"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidArgument(f"{self.program} get answered malformed JSON") from exc
        if username == _IDENTITY_TOKEN_USER:
            return Credential(identity_token=secret, origin=self.program)
        return Credential(username=username, password=secret, origin=self.program)

    def store(self, registry: str, username: str, secret: str) -> None:
        """Save a credential through the helper (``store``)."""
        payload = {"ServerURL": helper_server_url(registry), "Username": username, "Secret": secret}
        self._run("store", json.dumps(payload))

    def erase(self, registry: str) -> bool:
        """Remove the helper's entry; False if it had none."""
        return self._run("erase", helper_server_url(registry), missing_ok=True) is not None

    def _run(self, action: str, stdin: str, *, missing_ok: bool = False) -> str | None:
        try:
            proc = subprocess.run(
                [self.program, action],
                input=stdin,
                capture_output=True,
                text=True,
                timeout=_HELPER_TIMEOUT,
                env=self._env,
                check=False,
            )
        except FileNotFoundError as exc:
            raise InvalidArgument(
                f"credential helper {self.program} is configured but not on PATH"
            ) from exc
        except subprocess.TimeoutExpired as exc:
            raise InvalidArgument(f"credential helper {self.program} {action} timed out") from exc
        if proc.returncode != 0:
            message = (proc.stdout.strip() or proc.stderr.strip())[:200]
            if missing_ok and message == _HELPER_NOT_FOUND:
                return None
            raise InvalidArgument(f"credential helper {self.program} {action} failed: {message}")
        return proc.stdout


class AuthFile:
    """A docker ``config.json`` or (``namespaced``) podman ``auth.json``; re-read on every lookup.

    Lookup order per registry follows docker: ``credHelpers[registry]``,
    then ``credsStore``, then ``auths`` in :func:`matching_keys` order (an
    entry without a credential, docker's marker for a helper-stored login,
    is passed over).
    """

    def __init__(
        self, path: Path, *, env: Mapping[str, str] | None = None, namespaced: bool = False
    ) -> None:
        self.path = path
        self.origin = display_path(path)
        self.namespaced = namespaced
        self._env = env

    def get(self, registry: str, repository: str = "") -> Credential | None:
        doc = self.load()
        wanted = registry_key(registry)
        helper = self.helper_for(doc, wanted)
        if helper is not None:
            found = helper.get(wanted)
            if found is not None:
                return found
        auths = doc.get("auths") or {}
        if not isinstance(auths, dict):
            return None
        for key in matching_keys(auths, wanted, repository, namespaced=self.namespaced):
            entry = auths[key]
            credential = self._from_entry(entry, key) if isinstance(entry, dict) else None
            if credential is not None:
                return credential
        return None

    def helper_for(self, doc: Mapping[str, Any], registry: str) -> CredentialHelper | None:
        helpers = doc.get("credHelpers") or {}
        for key, name in helpers.items() if isinstance(helpers, dict) else ():
            if registry_key(str(key)) == registry and name:
                return CredentialHelper(str(name), env=self._env)
        store = doc.get("credsStore")
        return CredentialHelper(str(store), env=self._env) if store else None

    def _from_entry(self, entry: Mapping[str, Any], key: str) -> Credential | None:
        username = str(entry.get("username") or "")
        password = str(entry.get("password") or "")
        if entry.get("auth"):
            try:
                decoded = base64.b64decode(str(entry["auth"]), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError) as exc:
                raise InvalidArgument(
                    f"{self.origin}: the 'auth' of {key!r} is not base64 of user:password"
                ) from exc
            username, sep, password = decoded.partition(":")
            if not sep:
                raise InvalidArgument(f"{self.origin}: the 'auth' of {key!r} lacks a ':'")
        token = str(entry.get("identitytoken") or "")
        if not (username or password or token):
            return None
        return Credential(username, password, token, origin=f'{self.origin} entry "{key}"')

    def load(self) -> dict[str, Any]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.warning("cannot read %s: %s", self.origin, exc)
            return {}
        try:
            doc = load_json(text)
        except ValueError as exc:
            raise InvalidArgument(f"{self.origin} is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise InvalidArgument(f"{self.origin} is not a JSON object")
        return doc


class ChainedCredentials:
    """The first answer among several sources."""

    def __init__(self, sources: Sequence[CredentialSource]) -> None:
        self.sources = tuple(sources)

    def get(self, registry: str, repository: str = "") -> Credential | None:
        # The first source with any match answers, even if a later one has a more
        # specific key: containers/image reads its files in sequence the same way.
        for source in self.sources:
            credential = source.get(registry, repository)
            if credential is not None:
                return credential
        return None


class CachedCredentials:
    """Remember each (registry, repository) answer (a helper is a subprocess; files are re-read)."""

    def __init__(self, source: CredentialSource) -> None:
        self._source = source
        self._answers: dict[tuple[str, str], Credential | None] = {}
        self._lock = threading.Lock()

    def get(self, registry: str, repository: str = "") -> Credential | None:
        key = (registry, repository)
        with self._lock:
            if key not in self._answers:
                self._answers[key] = self._source.get(registry, repository)
            return self._answers[key]


def docker_config_path(env: Mapping[str, str] | None = None) -> Path:
    """``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``."""
    env = os.environ if env is None else env
    base = env.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


def podman_auth_paths(env: Mapping[str, str] | None = None) -> list[Path]:
    """podman's: ``$REGISTRY_AUTH_FILE``, else ``$XDG_RUNTIME_DIR/containers/auth.json``."""
    env = os.environ if env is None else env
    if env.get("REGISTRY_AUTH_FILE"):
        return [Path(env["REGISTRY_AUTH_FILE"])]
    if env.get("XDG_RUNTIME_DIR"):
        return [Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json"]
    return []


def default_credentials(env: Mapping[str, str] | None = None) -> ChainedCredentials:
    """podman's files first, then docker's config, as podman and skopeo read them.

    podman's ``auth.json`` keys may name namespaces; docker's ``config.json``
    keys are hosts, as docker reads them.
    """
    helper_env = dict(env) if env is not None else None
    sources = [AuthFile(p, env=helper_env, namespaced=True) for p in podman_auth_paths(env)]
    sources.append(AuthFile(docker_config_path(env), env=helper_env))
    return ChainedCredentials(sources)
