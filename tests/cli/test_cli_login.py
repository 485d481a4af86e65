"""``hypeman-images login``/``logout`` against a real htpasswd registry, then a private pull."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.images import make_image, make_layer
from support.push import push_image
from support.registry import RegistryServer, htpasswd_auth, start_registry
from support.tar import directory, file

CLI = str(Path(sys.executable).with_name("hypeman-images"))
USER, PASSWORD = "dora", "s3cret-for-login-test"


@pytest.fixture(scope="module")
def private_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    tmp = tmp_path_factory.mktemp("login-registry")
    with start_registry(tmp, auth=htpasswd_auth(tmp, {USER: PASSWORD})) as server:
        image = make_image([make_layer([directory("etc"), file("etc/motd", b"private\n")])])
        with httpx.Client(auth=(USER, PASSWORD)) as pusher:
            push_image(server.url, "team/app", "v1", image, client=pusher)
        yield server


def cli(home: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DOCKER_CONFIG": str(home / ".docker"), "HOME": str(home)}
    env.pop("REGISTRY_AUTH_FILE", None)
    env.pop("XDG_RUNTIME_DIR", None)
    return subprocess.run(
        [CLI, *args], input=stdin, capture_output=True, text=True, env=env, timeout=120
    )


def test_login_pull_logout(private_registry: RegistryServer, tmp_path: Path) -> None:
    host, data = private_registry.host, str(tmp_path / "data")
    ref = f"{host}/team/app:v1"

    anonymous = cli(tmp_path, "pull", "--data-dir", data, ref)
    assert anonymous.returncode == 4, anonymous.stderr
    assert host in anonymous.stderr

    wrong = cli(tmp_path, "login", "-u", USER, "--password-stdin", host, stdin="nope\n")
    assert wrong.returncode == 4
    assert "nope" not in wrong.stderr + wrong.stdout

    ok = cli(tmp_path, "login", "-u", USER, "--password-stdin", host, stdin=PASSWORD + "\n")
    assert ok.returncode == 0, ok.stderr
    config = tmp_path / ".docker" / "config.json"
    assert "config.json" in ok.stdout
    assert config.stat().st_mode & 0o077 == 0, "credentials file must be private"
    assert host in json.loads(config.read_text())["auths"]

    pulled = cli(tmp_path, "pull", "--data-dir", data, ref)
    assert pulled.returncode == 0, pulled.stderr
    assert PASSWORD not in pulled.stderr + pulled.stdout

    out = cli(tmp_path, "logout", host)
    assert out.returncode == 0 and "Removed" in out.stdout
    assert host not in json.loads(config.read_text()).get("auths", {})
    again = cli(tmp_path, "pull", "--data-dir", str(tmp_path / "data2"), ref)
    assert again.returncode == 4


def test_login_needs_a_user_name_without_a_terminal(tmp_path: Path) -> None:
    result = cli(tmp_path, "login", "--password-stdin", "registry.invalid", stdin="x\n")
    assert result.returncode == 2
    assert "-u USER" in result.stderr


def test_login_to_a_namespace_is_refused(tmp_path: Path) -> None:
    # podman login quay.io/team writes a namespaced auth.json key; our login
    # writes docker's config.json, whose keys are hosts (docker reads
    # "quay.io/team" as quay.io), so it takes a host only. Namespaced keys are
    # read from podman's auth.json.
    result = cli(tmp_path, "login", "-u", USER, "--password-stdin", "quay.io/team", stdin="x\n")
    assert result.returncode == 2
    assert "HOST[:PORT]" in result.stderr
    assert not (tmp_path / ".docker" / "config.json").exists()
