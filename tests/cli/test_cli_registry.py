"""Registry options and failures as a user meets them: ``hypeman-images`` in a subprocess.

Every server is real and on 127.0.0.1: docker-registry (plain, and as a
pull-through mirror), the fault proxy of ``support.faultproxy``, a plain HTTP
server for a foreign layer's URL, a socket whose accept queue is full. Docker
Hub is the one thing that cannot be reached here: the mirror test runs the CLI
with a guard that refuses, and records, any connection or name lookup that
would leave 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from support.disk import read_disk_tree
from support.faultproxy import Fault, fault_proxy
from support.images import Image, make_image, make_layer
from support.push import push_blob, push_manifest
from support.pushed import PushedImage
from support.registry import RegistryServer, start_registry
from support.service import CLI
from support.tar import directory, file

from hypeman_images.cli.config import registry_config
from hypeman_images.cli.parser import build_parser
from hypeman_images.oci.spec import OCI_MANIFEST
from hypeman_images.registry.config import RegistryConfig


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )


# -- foreign (non-distributable) layers --------------------------------------------------

FOREIGN_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
GREETING = b"fetched from the layer's own URL\n"


class BlobServer:
    """Plain HTTP on 127.0.0.1 serving ``blobs`` at ``/<digest>``; logs the paths asked for."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.asked: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.asked.append(self.path)
                body = blobs.get(self.path.lstrip("/"))
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def foreign_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, BlobServer]]:
    """``test/foreign:v1``, whose one layer is foreign: only its URL on 127.0.0.1 serves it.

    distribution refuses a manifest naming layer URLs unless
    ``validation.manifests.urls.allow`` matches them, so this registry allows loopback ones.
    """
    layer = make_layer([directory("etc"), file("etc/greeting", GREETING)])
    image: Image = make_image([layer], cmd=["/bin/sh"])
    blobs = BlobServer({layer.digest: layer.blob})
    manifest = json.loads(image.manifest)
    manifest["layers"][0].update(mediaType=FOREIGN_GZIP, urls=[f"{blobs.url}/{layer.digest}"])
    allow = {"validation": {"manifests": {"urls": {"allow": [r"^http://127\.0\.0\.1:"]}}}}
    tmp = tmp_path_factory.mktemp("foreign-registry")
    try:
        with start_registry(tmp, overrides=allow) as server:
            push_blob(server.url, "test/foreign", image.config)  # the layer stays out
            body = json.dumps(manifest).encode()
            push_manifest(server.url, "test/foreign", "v1", body, OCI_MANIFEST)
            yield f"{server.host}/test/foreign:v1", blobs
    finally:
        blobs.close()


def _greeting_on(disk: str) -> str | None:
    return read_disk_tree(disk)["/etc/greeting"].sha256


def test_a_foreign_layer_is_refused_by_default_and_pulled_when_allowed(
    foreign_image: tuple[str, BlobServer], data_dir: Path, tmp_path: Path
) -> None:
    ref, blobs = foreign_image
    blobs.asked.clear()
    refused = run("pull", "--data-dir", str(data_dir), ref)
    assert refused.returncode == 3, refused.stderr  # not found in the registry
    assert "foreign (non-distributable) layer" in refused.stderr
    assert f"fetch from {blobs.url}/sha256:" in refused.stderr
    assert "--allow-foreign-layers" in refused.stderr
    assert blobs.asked == []  # its URL was never touched

    allowed = run("pull", "--data-dir", str(data_dir), "--json", "--allow-foreign-layers", ref)
    assert allowed.returncode == 0, allowed.stderr
    assert len(blobs.asked) == 1 and blobs.asked[0].startswith("/sha256:")
    assert _greeting_on(json.loads(allowed.stdout)["disk"]) == hashlib.sha256(GREETING).hexdigest()

    # The same from registries.conf, into another data dir (no cached blob).
    conf = tmp_path / "registries.conf"
    conf.write_text("allow-foreign-layers = true\n")
    other = tmp_path / "other-data"
    by_conf = run("pull", "--data-dir", str(other), "--json", "--registries-conf", str(conf), ref)
    assert by_conf.returncode == 0, by_conf.stderr
    assert len(blobs.asked) == 2


# -- timeouts ------------------------------------------------------------------------------


@contextlib.contextmanager
def full_backlog() -> Iterator[str]:
    """``127.0.0.1:PORT`` of a socket that listens but never accepts, its queue full.

    Linux drops the SYN of any further connect (``tcp_abort_on_overflow`` is 0
    by default), so a client waits for its connect timeout: a registry host
    that is up but overwhelmed, or a firewall that drops packets.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    host, port = listener.getsockname()
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect((host, port))
            fillers.append(filler)
        time.sleep(0.1)
        with socket.socket() as probe:  # the queue really is full
            probe.settimeout(0.2)
            with pytest.raises(TimeoutError):
                probe.connect((host, port))
        yield f"{host}:{port}"
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


@pytest.mark.slow  # about 5 s of waiting: 8 timeouts of 0.3 s and the backoff between tries
def test_a_connect_timeout_fires_with_a_clear_message(data_dir: Path) -> None:
    with full_backlog() as host:
        started = time.monotonic()
        result = run(
            "pull", "--data-dir", str(data_dir), "--connect-timeout", "0.3", f"{host}/app:1"
        )
        elapsed = time.monotonic() - started
    # Exit 1: transient failures after the retries (docs/cli.md, "Exit codes").
    assert result.returncode == 1, result.stderr
    assert "connect timed out after 0.3 s" in result.stderr
    assert "--connect-timeout" in result.stderr
    assert "gave up after 4 attempts" in result.stderr
    # 4 attempts of 2 probes (HTTPS, then plain HTTP) of 0.3 s, and at most 3.5 s of backoff.
    assert elapsed < 15


def test_flags_win_over_registries_conf(tmp_path: Path) -> None:
    conf = tmp_path / "registries.conf"
    conf.write_text("connect-timeout = 5\nread-timeout = 7\nallow-foreign-layers = false\n")
    base = ["pull", "--registries-conf", str(conf)]

    def config(*flags: str) -> RegistryConfig:
        return registry_config(build_parser().parse_args([*base, *flags, "alpine"]))

    assert (config().connect_timeout, config().read_timeout) == (5, 7)
    assert not config().allow_foreign_layers
    flagged = config("--connect-timeout", "2", "--allow-foreign-layers")
    assert (flagged.connect_timeout, flagged.read_timeout) == (2, 7)
    assert flagged.allow_foreign_layers
    # Every command that talks to registries takes them.
    for command, *rest in (["boot", "alpine"], ["serve"], ["login", "ghcr.io"]):
        flags = ["--read-timeout", "3", "--allow-foreign-layers"]
        config_of = registry_config(build_parser().parse_args([command, *flags, *rest]))
        assert (config_of.read_timeout, config_of.allow_foreign_layers) == (3, True)


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--connect-timeout", "0"), ("--read-timeout", "-1"), ("--read-timeout", "nan")],
)
def test_a_timeout_must_be_positive(data_dir: Path, flag: str, value: str) -> None:
    result = run("pull", "--data-dir", str(data_dir), flag, value, "127.0.0.1:1/app:1")
    assert result.returncode == 2
    assert f"{flag} must be a number of seconds above 0" in result.stderr


# -- rate limits -------------------------------------------------------------------------

# What Docker Hub sends an anonymous client past its limit.
HUB_429 = Fault(
    "/manifests/",
    "replace",
    status=429,
    headers={
        "Content-Type": "application/json",
        "Retry-After": "30",
        "RateLimit-Limit": "100;w=21600",
        "RateLimit-Remaining": "0;w=21600",
    },
    body=b'{"errors":[{"code":"TOOMANYREQUESTS","message":"You have reached your pull rate '
    b'limit."}]}',
)


def test_429_exits_5_with_retry_after_and_shows_the_limit_with_v(
    alpine_ref: PushedImage, data_dir: Path
) -> None:
    with fault_proxy(alpine_ref.registry.url) as proxy:
        proxy.add(HUB_429)
        ref = f"{proxy.host}/{alpine_ref.repository}:{alpine_ref.tag}"
        quiet = run("pull", "--data-dir", str(data_dir), ref)
        loud = run("pull", "-v", "--data-dir", str(data_dir), ref)
        asked = len(proxy.requests("/manifests/"))
    assert quiet.returncode == loud.returncode == 5, quiet.stderr
    for result in (quiet, loud):
        assert "rate limiting requests (HTTP 429)" in result.stderr
        assert "retry after 30 s" in result.stderr
        assert "You have reached your pull rate limit (log in with hypeman-images" in result.stderr
    assert "100;w=21600" not in quiet.stderr
    assert f"{proxy.host} rate limit: limit=100;w=21600 remaining=0;w=21600" in loud.stderr
    assert asked == 2  # one request per run: a 429 is never retried


# -- mirrors -----------------------------------------------------------------------------

# Loaded into the CLI's interpreter (sitecustomize): refuses and records every
# connection and name lookup that is not for loopback. Audit hooks see both
# (PEP 578 events "socket.connect" and "socket.getaddrinfo").
_GUARD = """
import socket, sys

LOOPBACK = {"127.0.0.1", "::1", "localhost", b"127.0.0.1", b"::1", b"localhost"}

def _guard(event, args):
    if event == "socket.getaddrinfo":
        host = args[0]
    elif event == "socket.connect" and isinstance(args[1], tuple):
        host = args[1][0]
    else:
        return
    if host is not None and host not in LOOPBACK:
        with open(%(log)r, "a") as log:
            log.write(f"{event} {host!r}\\n")
        raise OSError(101, "network is unreachable (test guard: loopback only)")

sys.addaudithook(_guard)
"""


def loopback_only(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """The environment that loads the guard into the CLI, and the file it records to."""
    guard_dir = tmp_path / "guard"
    guard_dir.mkdir()
    log = tmp_path / "egress.log"
    (guard_dir / "sitecustomize.py").write_text(_GUARD % {"log": str(log)})
    # No credentials from this host's files: they play no part here.
    return {"PYTHONPATH": str(guard_dir), "DOCKER_CONFIG": str(tmp_path / "no-docker")}, log


@pytest.fixture(scope="module")
def hub_mirror(
    alpine_ref: PushedImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RegistryServer]:
    """docker-registry as a pull-through cache of the session registry, which stands for
    Docker Hub: it holds ``library/alpine:3.20.3``."""
    tmp = tmp_path_factory.mktemp("hub-mirror")
    with start_registry(tmp, proxy_remote_url=alpine_ref.registry.url) as server:
        yield server


@pytest.fixture(scope="module")
def empty_mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """A docker-registry that holds nothing: a mirror that misses (404)."""
    with start_registry(tmp_path_factory.mktemp("empty-mirror")) as server:
        yield server


def _mirror_conf(path: Path, origin: str, mirror: str) -> Path:
    path.write_text(
        f'[[registry]]\nlocation = "{origin}"\n[[registry.mirror]]\nlocation = "{mirror}"\n'
    )
    return path


def test_docker_io_pulls_go_to_the_mirror_and_never_to_docker_hub(
    hub_mirror: RegistryServer, alpine_ref: PushedImage, data_dir: Path, tmp_path: Path
) -> None:
    env, egress = loopback_only(tmp_path)
    conf = _mirror_conf(tmp_path / "registries.conf", "docker.io", hub_mirror.host)
    pulled = run(
        "pull", "--data-dir", str(data_dir), "--json", "--registries-conf", str(conf),
        "alpine:3.20.3", env=env,
    )  # fmt: skip
    assert pulled.returncode == 0, pulled.stderr
    doc = json.loads(pulled.stdout)
    assert doc["name"] == "docker.io/library/alpine:3.20.3"
    assert doc["digest"] == alpine_ref.manifest_digest
    assert Path(doc["disk"]).is_file()
    assert not egress.exists(), egress.read_text()  # nothing left 127.0.0.1
    assert "/v2/library/alpine/manifests/3.20.3" in hub_mirror.log()

    # The guard is real: without the mirror, the same pull heads for Docker Hub and is stopped.
    unmirrored = run("pull", "--data-dir", str(tmp_path / "d2"), "alpine:3.20.3", env=env)
    assert unmirrored.returncode != 0
    assert "registry-1.docker.io" in egress.read_text()


def test_a_mirror_miss_falls_back_to_the_origin(
    empty_mirror: RegistryServer, alpine_ref: PushedImage, data_dir: Path, tmp_path: Path
) -> None:
    # The origin is the session registry (Docker Hub cannot be reached here); the
    # mirror answers 404 for everything, as containerd and podman do, the next is tried.
    origin = alpine_ref.registry.host
    conf = _mirror_conf(tmp_path / "registries.conf", origin, empty_mirror.host)
    pulled = run(
        "pull", "--data-dir", str(data_dir), "--json", "--registries-conf", str(conf),
        alpine_ref.ref,
    )  # fmt: skip
    assert pulled.returncode == 0, pulled.stderr
    assert json.loads(pulled.stdout)["digest"] == alpine_ref.manifest_digest
    assert "WARNING" not in pulled.stderr  # a miss is no failure; -v tells of it
    # The mirror was asked first and said it lacks the image.
    mirror_log = empty_mirror.log()
    assert f"/v2/{alpine_ref.repository}/manifests/{alpine_ref.tag}" in mirror_log
    assert "manifest unknown" in mirror_log
