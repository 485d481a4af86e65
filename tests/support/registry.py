"""Run Debian's ``docker-registry`` (distribution 2.8) on 127.0.0.1 for tests.

The config is written by hand as YAML (no PyYAML): a tiny renderer turns
nested dicts into block YAML with JSON-quoted strings, which YAML accepts as
double-quoted scalars. Auth, TLS and pull-through proxy are options so that
later tests can reuse the same starter.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REGISTRY_BINARY = "/usr/bin/docker-registry"
START_TIMEOUT = 15.0
_BIND_ATTEMPTS = 5


class RegistryStartError(RuntimeError):
    """The registry did not become healthy; the message carries its log."""


@dataclass(frozen=True)
class RegistryServer:
    """A running registry: ``url`` is ``http(s)://127.0.0.1:PORT``, ``host`` ``127.0.0.1:PORT``."""

    url: str
    host: str
    port: int
    root: Path  # storage root (filesystem driver)
    log_path: Path
    config_path: Path
    pid: int

    def log(self) -> str:
        """The registry's log so far (for assertion messages)."""
        return self.log_path.read_text(errors="replace")


def _yaml(value: Any, indent: int = 0) -> str:
    """Block-style YAML for dicts/lists of str, int, bool; strings JSON-quoted."""
    pad = "  " * indent
    if isinstance(value, Mapping):
        lines = []
        for key, item in value.items():
            if isinstance(item, Mapping | list) and item:
                lines.append(f"{pad}{key}:\n{_yaml(item, indent + 1)}")
            else:
                lines.append(f"{pad}{key}: {_scalar(item)}")
        return "\n".join(lines)
    if isinstance(value, list):
        return "\n".join(f"{pad}- {_scalar(item)}" for item in value)
    return pad + _scalar(value)


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Mapping):
        return "{}"
    if isinstance(value, list):
        return "[]"
    return json.dumps(str(value))


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def registry_config(
    root: Path,
    port: int,
    *,
    auth: Mapping[str, Any] | None = None,
    tls: tuple[Path, Path] | None = None,
    proxy_remote_url: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The registry config as a dict (see distribution's ``configuration.md``).

    ``auth`` is the ``auth:`` section as-is, e.g. ``{"htpasswd": {"realm":
    "r", "path": "/x/htpasswd"}}`` or ``{"token": {"realm": …, "service": …,
    "issuer": …, "rootcertbundle": …}}``.
    """
    config: dict[str, Any] = {
        "version": "0.1",
        "log": {"level": "info", "formatter": "text"},
        "storage": {
            "filesystem": {"rootdirectory": str(root)},
            "delete": {"enabled": True},
            # No background purge of upload dirs while tests run.
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {
            "addr": f"127.0.0.1:{port}",
            # A fixed secret silences the warning and keeps upload state valid.
            "secret": secrets.token_hex(16),
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        },
    }
    if auth is not None:
        config["auth"] = dict(auth)
    if tls is not None:
        config["http"]["tls"] = {"certificate": str(tls[0]), "key": str(tls[1])}
    if proxy_remote_url is not None:
        config["proxy"] = {"remoteurl": proxy_remote_url}
    return _merge(config, overrides or {})


def free_port() -> int:
    """A port that was free a moment ago (the registry may still lose a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _wait_healthy(
    process: subprocess.Popen[bytes], url: str, log_path: Path, timeout: float
) -> bool:
    """True once *this* process answers ``GET /v2/`` (200 or 401); False if it died.

    Each probe carries a nonce in its User-Agent, and an answer counts only
    once the nonce shows up in this process's access log: if another test
    session's server took the port in the race after :func:`free_port`, it is
    the one answering while ours dies of "address already in use", and the
    fixture would otherwise hand out a stranger's registry.
    """
    deadline = time.monotonic() + timeout
    nonce = secrets.token_hex(8)
    answered = False
    with httpx.Client(verify=False, timeout=2.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            if not answered:
                try:
                    response = client.get(f"{url}/v2/", headers={"User-Agent": f"probe-{nonce}"})
                    answered = response.status_code in (200, 401)
                except httpx.TransportError:
                    pass
            if answered and nonce.encode() in log_path.read_bytes():
                return True
            time.sleep(0.05)
    _stop(process)
    raise RegistryStartError(
        f"registry at {url} not healthy after {timeout}s; log:\n"
        + log_path.read_text(errors="replace")
    )


@contextmanager
def start_registry(
    tmp_dir: Path,
    *,
    auth: Mapping[str, Any] | None = None,
    tls: tuple[Path, Path] | None = None,
    proxy_remote_url: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    extra: str = "",
    timeout: float = START_TIMEOUT,
) -> Iterator[RegistryServer]:
    """Start a registry storing under ``tmp_dir/storage``; stop it on exit.

    ``extra`` is raw YAML appended at the top level (it must not repeat a
    top-level key already written; use ``overrides`` to change those).
    If the chosen port is taken between picking and binding, another is tried.
    """
    tmp_dir.mkdir(parents=True, exist_ok=True)
    root = tmp_dir / "storage"
    root.mkdir(exist_ok=True)
    scheme = "https" if tls else "http"
    for attempt in range(_BIND_ATTEMPTS):
        port = free_port()
        config_path = tmp_dir / "config.yml"
        log_path = tmp_dir / f"registry-{attempt}.log"
        config = registry_config(
            root, port, auth=auth, tls=tls, proxy_remote_url=proxy_remote_url, overrides=overrides
        )
        config_path.write_text(_yaml(config) + "\n" + extra + "\n")
        url = f"{scheme}://127.0.0.1:{port}"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [REGISTRY_BINARY, "serve", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "OTEL_TRACES_EXPORTER": "none"},
            )
        if _wait_healthy(process, url, log_path, timeout):
            break
        log_text = log_path.read_text(errors="replace")
        if "address already in use" not in log_text:
            raise RegistryStartError(f"registry exited with {process.returncode}; log:\n{log_text}")
    else:
        raise RegistryStartError(f"no free port after {_BIND_ATTEMPTS} attempts; log:\n{log_text}")
    server = RegistryServer(
        url, f"127.0.0.1:{port}", port, root, log_path, config_path, process.pid
    )
    try:
        yield server
    finally:
        _stop(process)


def htpasswd_auth(tmp_dir: Path, users: Mapping[str, str], realm: str = "test") -> dict[str, Any]:
    """An ``auth:`` section for basic auth; writes bcrypt entries (the only kind 2.8 takes)."""
    path = tmp_dir / "htpasswd"
    lines = []
    for user, password in users.items():
        result = subprocess.run(
            ["htpasswd", "-nbB", user, password], capture_output=True, text=True, check=True
        )
        lines.append(result.stdout.strip())
    path.write_text("\n".join(lines) + "\n")
    return {"htpasswd": {"realm": realm, "path": str(path)}}


def self_signed_cert(tmp_dir: Path) -> tuple[Path, Path]:
    """A throwaway certificate for ``127.0.0.1`` (IP SAN) and its key, PEM files."""
    cert, key = tmp_dir / "cert.pem", tmp_dir / "key.pem"
    subject = ["-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    files = ["-keyout", str(key), "-out", str(cert)]
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            *subject,
            *files,
        ],
        capture_output=True,
        check=True,
    )
    return cert, key
