"""Credential sources: docker config.json, podman auth.json, credential helpers, login/logout."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from hypeman_images.errors import InvalidArgument
from hypeman_images.registry.credentials import (
    AuthFile,
    ChainedCredentials,
    Credential,
    StaticCredentials,
    default_credentials,
    docker_config_path,
    lookup_order,
    matching_keys,
    registry_key,
)
from hypeman_images.registry.login import login, logout


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _write(path: Path, doc: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize(
    ("key", "registry"),
    [
        pytest.param("https://index.docker.io/v1/", "docker.io", id="hub-legacy-key"),
        pytest.param("index.docker.io", "docker.io", id="hub-index-host"),
        pytest.param("registry-1.docker.io", "docker.io", id="hub-api-host"),
        pytest.param("docker.io", "docker.io", id="hub-bare"),
        pytest.param("ghcr.io", "ghcr.io", id="bare-host"),
        pytest.param("https://quay.io", "quay.io", id="with-scheme"),
        pytest.param("http://127.0.0.1:5000/v2/", "127.0.0.1:5000", id="scheme-port-path"),
    ],
)
def test_registry_key(key: str, registry: str) -> None:
    assert registry_key(key) == registry


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        pytest.param({"auth": _b64("al:pa:ss")}, Credential("al", "pa:ss"), id="auth-b64"),
        pytest.param(
            {"username": "al", "password": "pw"}, Credential("al", "pw"), id="username-password"
        ),
        pytest.param(
            {"auth": _b64("al:"), "identitytoken": "tok"},
            Credential("al", "", "tok"),
            id="identity-token",
        ),
    ],
)
def test_docker_config_entries(tmp_path: Path, entry: dict[str, str], expected: Credential) -> None:
    path = _write(tmp_path / "config.json", {"auths": {"https://index.docker.io/v1/": entry}})
    found = AuthFile(path).get("docker.io")
    assert found is not None
    assert (found.username, found.password, found.identity_token) == (
        expected.username,
        expected.password,
        expected.identity_token,
    )
    assert found.origin == f'{path} entry "https://index.docker.io/v1/"'


# -- keys per namespace or repository (containers-auth.json(5)) ------------------------------


@pytest.mark.parametrize(
    ("registry", "repository", "expected"),
    [
        pytest.param(
            "quay.io",
            "team/sub/app",
            ["quay.io/team/sub/app", "quay.io/team/sub", "quay.io/team", "quay.io"],
            id="deep",
        ),
        pytest.param(
            "docker.io",
            "library/alpine",
            ["docker.io/library/alpine", "docker.io/library", "docker.io"],
            id="hub",
        ),
        pytest.param(
            "index.docker.io", "x/y", ["docker.io/x/y", "docker.io/x", "docker.io"], id="hub-alias"
        ),
        pytest.param("localhost:5000", "app", ["localhost:5000/app", "localhost:5000"], id="port"),
        pytest.param("ghcr.io", "", ["ghcr.io"], id="no-repository"),
    ],
)
def test_lookup_order(registry: str, repository: str, expected: list[str]) -> None:
    assert lookup_order(registry, repository) == expected


KEYS = [
    "quay.io",
    "quay.io/team",
    "quay.io/team/app",
    "quay.io/teamx",
    "https://quay.io/v1/",
    "quay.io:8443/team",
    "docker.io/library",
    "https://index.docker.io/v1/",
    "index.docker.io/library/alpine",
]


@pytest.mark.parametrize(
    ("registry", "repository", "namespaced", "expected"),
    [
        pytest.param(
            "quay.io",
            "team/app",
            True,
            ["quay.io/team/app", "quay.io/team", "quay.io", "https://quay.io/v1/"],
            id="repository-then-namespace-then-host",
        ),
        pytest.param(
            "quay.io",
            "team/other",
            True,
            ["quay.io/team", "quay.io", "https://quay.io/v1/"],
            id="namespace",
        ),
        pytest.param(
            "quay.io",
            "teamx2/app",
            True,
            ["quay.io", "https://quay.io/v1/"],
            id="no-partial-component",
        ),
        pytest.param(
            "quay.io", "tea", True, ["quay.io", "https://quay.io/v1/"], id="shorter-component"
        ),
        pytest.param("quay.io:8443", "team/app", True, ["quay.io:8443/team"], id="port-is-host"),
        pytest.param(
            "docker.io",
            "library/alpine",
            True,
            # index.docker.io/… is not docker.io/…: containers/image compares
            # namespaced keys as written.
            ["docker.io/library", "https://index.docker.io/v1/"],
            id="hub",
        ),
        pytest.param(
            "quay.io",
            "teamx2/app",
            False,
            ["quay.io", "quay.io/team", "quay.io/team/app", "quay.io/teamx", "https://quay.io/v1/"],
            id="docker-config-ignores-paths",
        ),
        pytest.param(
            "docker.io",
            "library/alpine",
            False,
            ["https://index.docker.io/v1/", "docker.io/library", "index.docker.io/library/alpine"],
            id="docker-config-hub-server-address-first",
        ),
    ],
)
def test_matching_keys(
    registry: str, repository: str, namespaced: bool, expected: list[str]
) -> None:
    assert matching_keys(KEYS, registry, repository, namespaced=namespaced) == expected


def test_auth_json_picks_the_most_specific_key(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "auth.json",
        {
            "auths": {
                "quay.io": {"auth": _b64("host:1")},
                "quay.io/team": {"auth": _b64("team:2")},
                "quay.io/team/app": {"auth": _b64("app:3")},
                "quay.io/empty": {},  # docker's helper marker: passed over
            }
        },
    )
    source = AuthFile(path, namespaced=True)
    users = {
        repository: getattr(source.get("quay.io", repository), "username", None)
        for repository in ("team/app", "team/db", "teamx/app", "empty/app", "")
    }
    assert users == {
        "team/app": "app",
        "team/db": "team",
        "teamx/app": "host",
        "empty/app": "host",
        "": "host",
    }
    found = source.get("quay.io", "team/db")
    assert found is not None and found.origin == f'{path} entry "quay.io/team"'
    assert "team:2" not in found.describe() and 'entry "quay.io/team"' in found.describe()


def test_namespaced_key_alone_does_not_apply_to_another_namespace(tmp_path: Path) -> None:
    path = _write(tmp_path / "auth.json", {"auths": {"quay.io/team": {"auth": _b64("t:1")}}})
    source = AuthFile(path, namespaced=True)
    assert source.get("quay.io", "teamx/app") is None
    assert source.get("quay.io") is None
    # docker's config.json reads the same key as the host quay.io, as docker does.
    docker = AuthFile(path)
    found = docker.get("quay.io", "teamx/app")
    assert found is not None and found.username == "t"


def test_docker_config_prefers_the_exact_host_key(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "config.json",
        {"auths": {"quay.io/team": {"auth": _b64("t:1")}, "quay.io": {"auth": _b64("h:2")}}},
    )
    found = AuthFile(path).get("quay.io", "team/app")
    assert found is not None and found.username == "h"


def test_the_first_file_with_a_match_wins(tmp_path: Path) -> None:
    # containers/image reads its files in sequence until one has a credential: a
    # host key in the first file beats a repository key in the second.
    first = _write(tmp_path / "a.json", {"auths": {"quay.io": {"auth": _b64("first:1")}}})
    second = _write(tmp_path / "b.json", {"auths": {"quay.io/team": {"auth": _b64("second:2")}}})
    chain = ChainedCredentials(
        [AuthFile(first, namespaced=True), AuthFile(second, namespaced=True)]
    )
    found = chain.get("quay.io", "team/app")
    assert found is not None and found.username == "first"
    found = ChainedCredentials([AuthFile(second, namespaced=True)]).get("quay.io", "team/app")
    assert found is not None and found.username == "second"


def test_default_chain_reads_auth_json_namespaced_and_docker_config_by_host(
    tmp_path: Path,
) -> None:
    docker = _write(
        tmp_path / "docker" / "config.json", {"auths": {"ghcr.io/org": {"auth": _b64("d:1")}}}
    )
    podman = _write(tmp_path / "auth.json", {"auths": {"ghcr.io/org": {"auth": _b64("p:2")}}})
    env = {"DOCKER_CONFIG": str(docker.parent), "REGISTRY_AUTH_FILE": str(podman)}
    chain = default_credentials(env)
    org, other = chain.get("ghcr.io", "org/app"), chain.get("ghcr.io", "orgx/app")
    assert org is not None and org.username == "p"
    assert other is not None and other.username == "d"  # docker's host-only reading


def test_static_credentials_match_like_auth_json() -> None:
    team = Credential("t", "1", origin="flag")
    host = Credential("h", "2", origin="flag")
    source = StaticCredentials({"quay.io/team": team, "https://quay.io": host})
    assert source.get("quay.io", "team/app") is team
    assert source.get("quay.io", "teamx/app") is host
    assert StaticCredentials({"https://index.docker.io/v1/": host}).get("docker.io") is host


def test_credential_helpers_are_asked_per_host(helper_env: dict[str, str]) -> None:
    path = _write(
        docker_config_path(helper_env),
        {"credHelpers": {"ghcr.io": "teststore"}, "auths": {}},
    )
    login("ghcr.io", "octo", "pw", env=helper_env)
    found = AuthFile(path, env=helper_env, namespaced=True).get("ghcr.io", "org/app")
    assert found is not None and found.origin == "docker-credential-teststore"
    log = (Path(helper_env["HELPER_STORE"]) / "log").read_text()
    assert "get ghcr.io" in log
    assert "org/app" not in log


def test_missing_file_and_registry_give_none(tmp_path: Path) -> None:
    assert AuthFile(tmp_path / "absent.json").get("ghcr.io") is None
    path = _write(tmp_path / "config.json", {"auths": {"quay.io": {"auth": _b64("a:b")}}})
    assert AuthFile(path).get("ghcr.io") is None


def test_malformed_auth_is_an_error_without_the_secret(tmp_path: Path) -> None:
    path = _write(tmp_path / "config.json", {"auths": {"quay.io": {"auth": "!!notbase64"}}})
    with pytest.raises(InvalidArgument, match=r"quay\.io") as caught:
        AuthFile(path).get("quay.io")
    assert "notbase64" not in str(caught.value)


@pytest.mark.parametrize(
    "text", [b'{"auths":' + b"9" * 5000 + b"}", b"[" * 100_000], ids=["long-number", "deep"]
)
def test_an_auth_file_no_parser_takes_is_a_clear_error(tmp_path: Path, text: bytes) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(text)
    with pytest.raises(InvalidArgument, match=r"config\.json is not valid JSON"):
        AuthFile(path).get("quay.io")


def test_secrets_are_not_in_repr() -> None:
    text = repr(Credential("al", "hunter2", "tok", origin="x"))
    assert "hunter2" not in text and "tok'" not in text


def test_default_chain_order(tmp_path: Path) -> None:
    docker = _write(tmp_path / "docker" / "config.json", {"auths": {"a.io": {"auth": _b64("d:1")}}})
    podman = _write(
        tmp_path / "run" / "containers" / "auth.json",
        {"auths": {"a.io": {"auth": _b64("p:2")}, "b.io": {"auth": _b64("p:3")}}},
    )
    explicit = _write(tmp_path / "explicit.json", {"auths": {"c.io": {"auth": _b64("e:4")}}})
    env = {"DOCKER_CONFIG": str(docker.parent), "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    chain = default_credentials(env)
    a = chain.get("a.io")
    assert a is not None and (a.username, a.origin) == ("p", f'{podman} entry "a.io"')
    assert chain.get("c.io") is None
    # $REGISTRY_AUTH_FILE replaces the XDG file; docker's config stays the fallback.
    chain = default_credentials({**env, "REGISTRY_AUTH_FILE": str(explicit)})
    c, a = chain.get("c.io"), chain.get("a.io")
    assert c is not None and c.username == "e"
    assert a is not None and a.username == "d"


def test_docker_config_path(tmp_path: Path) -> None:
    assert docker_config_path({"DOCKER_CONFIG": str(tmp_path)}) == tmp_path / "config.json"
    assert docker_config_path({}) == Path.home() / ".docker" / "config.json"


# -- credential helpers -------------------------------------------------------------------

HELPER = r"""#!/bin/sh
# A docker-credential-helpers protocol stand-in backed by one JSON file per server.
store="$HELPER_STORE"
action="$1"
input=$(cat)
echo "$action $input" >> "$store/log"
case "$action" in
get)
    key=$(printf %s "$input" | base64 | tr -d '\n=/+')
    if [ -f "$store/$key" ]; then cat "$store/$key"; else
        echo "credentials not found in native keychain"; exit 1; fi ;;
store)
    server=$(printf %s "$input" | sed 's/.*"ServerURL": *"\([^"]*\)".*/\1/')
    key=$(printf %s "$server" | base64 | tr -d '\n=/+')
    printf %s "$input" > "$store/$key" ;;
erase)
    key=$(printf %s "$input" | base64 | tr -d '\n=/+')
    if [ -f "$store/$key" ]; then rm "$store/$key"; else
        echo "credentials not found in native keychain"; exit 1; fi ;;
esac
"""


@pytest.fixture
def helper_env(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-teststore"
    helper.write_text(HELPER)
    helper.chmod(0o755)
    store = tmp_path / "store"
    store.mkdir()
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HELPER_STORE": str(store),
        "DOCKER_CONFIG": str(tmp_path / "docker"),
    }


def test_credential_helper_roundtrip(helper_env: dict[str, str]) -> None:
    path = _write(docker_config_path(helper_env), {"credHelpers": {"ghcr.io": "teststore"}})
    assert AuthFile(path, env=helper_env).get("ghcr.io") is None
    where = login("ghcr.io", "octo", "ghp_secret", env=helper_env)
    assert where == "docker-credential-teststore"
    found = AuthFile(path, env=helper_env).get("ghcr.io")
    assert found is not None
    assert (found.username, found.password, found.origin) == (
        "octo",
        "ghp_secret",
        "docker-credential-teststore",
    )
    assert "ghp_secret" not in path.read_text()
    assert logout("ghcr.io", env=helper_env)
    assert AuthFile(path, env=helper_env).get("ghcr.io") is None


def test_creds_store_asks_with_docker_hub_server_url(helper_env: dict[str, str]) -> None:
    path = _write(docker_config_path(helper_env), {"credsStore": "teststore"})
    login("docker.io", "<token>", "identity", env=helper_env)
    found = AuthFile(path, env=helper_env).get("docker.io")
    assert found is not None and found.identity_token == "identity"
    log = (Path(helper_env["HELPER_STORE"]) / "log").read_text()
    assert "get https://index.docker.io/v1/" in log


def test_missing_helper_is_a_clear_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "config.json", {"credsStore": "nonexistent-xyz"})
    with pytest.raises(InvalidArgument, match="docker-credential-nonexistent-xyz"):
        AuthFile(path).get("ghcr.io")


# -- login / logout -----------------------------------------------------------------------


def test_login_writes_auths_atomically_with_mode_0600(tmp_path: Path) -> None:
    path = _write(tmp_path / "config.json", {"auths": {"quay.io": {"auth": _b64("q:1")}}, "x": 1})
    where = login("docker.io", "al", "pw", config_path=path)
    assert where == str(path)
    doc = json.loads(path.read_text())
    assert doc["x"] == 1
    assert doc["auths"]["https://index.docker.io/v1/"] == {"auth": _b64("al:pw")}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temp file left
    found = AuthFile(path).get("docker.io")
    assert found is not None and found.password == "pw"


def test_login_replaces_an_entry_under_another_key(tmp_path: Path) -> None:
    path = _write(tmp_path / "config.json", {"auths": {"https://ghcr.io": {"auth": _b64("o:1")}}})
    login("ghcr.io", "n", "2", config_path=path)
    assert list(json.loads(path.read_text())["auths"]) == ["ghcr.io"]


def test_logout(tmp_path: Path) -> None:
    path = tmp_path / "new" / "config.json"
    login("127.0.0.1:5000", "al", "pw", config_path=path)
    assert logout("127.0.0.1:5000", config_path=path)
    assert not logout("127.0.0.1:5000", config_path=path)
    assert AuthFile(path).get("127.0.0.1:5000") is None
