"""Where registry credentials come from, and how ``login``/``logout`` store them.

A :class:`CredentialSource` answers one question, "what credential do I have
for this registry?", and says where the answer came from so an error can
name it (never the secret). The sources follow the files other tools write:

* docker's ``config.json`` (``$DOCKER_CONFIG/config.json``, else
  ``~/.docker/config.json``): ``auths`` entries (base64 ``auth`` or
  ``username``/``password``, ``identitytoken``), ``credHelpers`` per registry
  and a default ``credsStore``, both run as ``docker-credential-<name> get``;
* podman/skopeo's ``auth.json`` (``$REGISTRY_AUTH_FILE``, else
  ``${XDG_RUNTIME_DIR}/containers/auth.json``), which has the same format.

:func:`default_credentials` chains them in the order podman reads them.
Keys are matched like docker's ``ConvertToHostname``: a key may be a bare
host, a host with a scheme and path (``https://host/v1/``), and Docker Hub is
stored under ``https://index.docker.io/v1/``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import subprocess
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .errors import InvalidArgument, StorageError

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
    """A user name and password, or an OAuth2 identity (refresh) token.

    ``origin`` says where it came from ("~/.docker/config.json",
    "docker-credential-pass"); ``repr`` hides the secrets.
    """

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    origin: str = ""

    def describe(self) -> str:
        """Who and where from, for error messages: never the secret."""
        who = f"user {self.username!r}" if self.username else "an identity token"
        return f"{who} from {self.origin}" if self.origin else who


class CredentialSource(Protocol):
    """Something that may hold a credential for a registry host (``host[:port]``)."""

    def get(self, registry: str) -> Credential | None:
        """The credential for ``registry`` (as in a Reference: ``docker.io``), or None."""
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


def _display(path: Path) -> str:
    home = Path.home()
    with contextlib.suppress(ValueError):
        return "~/" + str(path.relative_to(home))
    return str(path)


class StaticCredentials:
    """A fixed map of registry → credential (flags, tests, the API)."""

    def __init__(self, entries: Mapping[str, Credential]) -> None:
        self._entries = {registry_key(k): v for k, v in entries.items()}

    def get(self, registry: str) -> Credential | None:
        return self._entries.get(registry_key(registry))


class CredentialHelper:
    """A ``docker-credential-<name>`` program on PATH (the docker helper protocol)."""

    def __init__(self, name: str, *, env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.program = f"docker-credential-{name}"
        self._env = dict(env) if env is not None else None

    def get(self, registry: str) -> Credential | None:
        out = self._run("get", helper_server_url(registry), missing_ok=True)
        if out is None:
            return None
        try:
            doc = json.loads(out)
            username, secret = str(doc.get("Username", "")), str(doc["Secret"])
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
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
    """A docker ``config.json`` or podman ``auth.json``; re-read on every lookup.

    Lookup order per registry follows docker: ``credHelpers[registry]``,
    then ``credsStore``, then ``auths``.
    """

    def __init__(self, path: Path, *, env: Mapping[str, str] | None = None) -> None:
        self.path = path
        self.origin = _display(path)
        self._env = env

    def get(self, registry: str) -> Credential | None:
        doc = self._load()
        wanted = registry_key(registry)
        helper = self._helper_for(doc, wanted)
        if helper is not None:
            found = helper.get(wanted)
            if found is not None:
                return found
        for key, entry in (doc.get("auths") or {}).items():
            if registry_key(str(key)) == wanted and isinstance(entry, dict):
                credential = self._from_entry(entry, str(key))
                if credential is not None:
                    return credential
        return None

    def _helper_for(self, doc: Mapping[str, Any], registry: str) -> CredentialHelper | None:
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
        return Credential(username, password, token, origin=self.origin)

    def _load(self) -> dict[str, Any]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.warning("cannot read %s: %s", self.origin, exc)
            return {}
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"{self.origin} is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise InvalidArgument(f"{self.origin} is not a JSON object")
        return doc


class ChainedCredentials:
    """The first answer among several sources."""

    def __init__(self, sources: Sequence[CredentialSource]) -> None:
        self.sources = tuple(sources)

    def get(self, registry: str) -> Credential | None:
        for source in self.sources:
            credential = source.get(registry)
            if credential is not None:
                return credential
        return None


class CachedCredentials:
    """Remember each registry's answer (a helper is a subprocess; files are re-read)."""

    def __init__(self, source: CredentialSource) -> None:
        self._source = source
        self._answers: dict[str, Credential | None] = {}
        self._lock = threading.Lock()

    def get(self, registry: str) -> Credential | None:
        with self._lock:
            if registry not in self._answers:
                self._answers[registry] = self._source.get(registry)
            return self._answers[registry]


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
    """podman's files first, then docker's config, as podman and skopeo read them."""
    paths = [*podman_auth_paths(env), docker_config_path(env)]
    helper_env = dict(env) if env is not None else None
    return ChainedCredentials([AuthFile(p, env=helper_env) for p in paths])


def login(
    registry: str,
    username: str,
    password: str,
    *,
    config_path: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """Save a credential for ``registry`` the way ``docker login`` does; return where.

    A ``credHelpers`` entry or ``credsStore`` in the file receives it through
    ``docker-credential-<name> store``; otherwise it goes into ``auths`` as
    base64 ``user:password``. The file is replaced atomically with mode 0600.
    Checking the credential against the registry is the caller's business
    (see ``RegistryClient.check_login``).
    """
    path = config_path or docker_config_path(env)
    doc = AuthFile(path, env=env)._load()
    key = helper_server_url(registry)
    helper = AuthFile(path, env=env)._helper_for(doc, registry_key(registry))
    if helper is not None:
        helper.store(registry, username, password)
        auths = doc.setdefault("auths", {})
        auths[key] = {}  # docker keeps an empty marker entry for helper-stored logins
        _write_json_atomic(path, doc)
        return helper.program
    auth = base64.b64encode(f"{username}:{password}".encode()).decode()
    doc.setdefault("auths", {})
    _drop_keys(doc["auths"], registry)
    doc["auths"][key] = {"auth": auth}
    _write_json_atomic(path, doc)
    return _display(path)


def logout(
    registry: str, *, config_path: Path | None = None, env: Mapping[str, str] | None = None
) -> bool:
    """Forget ``registry``'s credential (helper and ``auths``); False if there was none."""
    path = config_path or docker_config_path(env)
    file = AuthFile(path, env=env)
    doc = file._load()
    helper = file._helper_for(doc, registry_key(registry))
    removed = helper.erase(registry) if helper is not None else False
    if _drop_keys(doc.get("auths") or {}, registry):
        removed = True
        _write_json_atomic(path, doc)
    return removed


def _drop_keys(auths: dict[str, Any], registry: str) -> bool:
    keys = [k for k in auths if registry_key(k) == registry_key(registry)]
    for k in keys:
        del auths[k]
    return bool(keys)


def _write_json_atomic(path: Path, doc: Mapping[str, Any]) -> None:
    """Write ``doc`` to ``path`` via an fsynced temp file and rename; mode 0600."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=".config.json.", dir=path.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as out:
                json.dump(doc, out, indent="\t")
                out.write("\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise StorageError(f"cannot write {_display(path)}: {exc.strerror or exc}") from exc
