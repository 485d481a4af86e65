"""Hostile images: every attack in tests/support/hostile.py, pulled from a real registry.

For each case the pull must either fail with the error class and message the
case names, recorded in the digest's ``metadata.json`` (``status: failed``),
or -- for attacks the flattener neutralises by design -- succeed with the
attack contained in the disk. Either way:

- nothing is written outside the data dir (a canary dir the names aim at is
  unchanged, no ``pwned`` file appears anywhere under the test's tmp dir);
- the data dir holds only the layout docs/design.md describes, and it is
  consistent (:func:`support.hostile.store_problems`), also after ``gc``;
- nothing leaks: open fds and threads are back to their count, no temp file
  is left, and Python's peak allocation stays far below the bombs' size.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.faultproxy import Fault, FaultProxy, fault_proxy
from support.hostile import (
    CASES,
    HostileCase,
    diff_id_mismatch,
    entry_flood,
    gzip_claims_zstd_is,
    long_number_in_manifest,
    open_fds,
    snapshot,
    store_problems,
    unexpected_paths,
)
from support.pushed import PushedImage
from support.registry import RegistryServer

from hypeman_images.build.manager import ImageManager
from hypeman_images.build.options import BuildOptions
from hypeman_images.errors import HypemanError
from hypeman_images.layers.limits import Limits
from hypeman_images.registry.client import RegistryClient
from hypeman_images.registry.config import RegistryConfig
from hypeman_images.store.images import StoredImage

CLI = str(Path(sys.executable).with_name("hypeman-images"))
PEAK_BYTES = 48 << 20  # every bomb inflates to 64 MiB or more


def fast_client() -> RegistryClient:
    return RegistryClient(config=RegistryConfig(backoff_base=0.0, max_attempts=2))


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    """A host directory the hostile names aim at; it must never change."""
    path = tmp_path / "canary"
    path.mkdir()
    (path / "secret").write_text("host secret\n")
    return path


@pytest.fixture
def proxy(registry: RegistryServer) -> Iterator[FaultProxy]:
    """A fault proxy in front of the session registry (serves the odd documents)."""
    with fault_proxy(registry.url) as running:
        yield running


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point ``tempfile`` at an empty dir of our own, so leftovers can be counted."""
    path = tmp_path / "tmp"
    path.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    monkeypatch.setenv("TMPDIR", str(path))
    return path


def install(case: HostileCase, registry: RegistryServer, proxy: FaultProxy) -> str:
    """Push the case and return its reference through the proxy."""
    repo = f"hostile/{case.name}"
    case.push(registry.url, repo, "v1")
    for fragment, (body, headers) in case.served.items():
        proxy.add(Fault(f"/v2/{repo}{fragment}", "replace", status=200, body=body, headers=headers))
    return f"{proxy.host}/{repo}:v1"


def digest_dir(data_dir: Path, proxy: FaultProxy, case: HostileCase) -> Path:
    return data_dir / "images" / proxy.host / "hostile" / case.name / case.manifest_digest[7:]


def _check_outcome(
    case: HostileCase,
    error: BaseException | None,
    image: StoredImage | None,
    data_dir: Path,
    proxy: FaultProxy,
) -> bool:
    """The pull did what the case says; a failure is named and recorded."""
    if error is None:
        assert image is not None and image.record.status == "ready"
        if case.check is not None:
            case.check(image.disk)
        return True
    assert isinstance(error, HypemanError)
    assert case.error is not None and isinstance(error, case.error)
    assert re.search(case.says, error.message, re.S), error.message
    meta = digest_dir(data_dir, proxy, case) / "metadata.json"
    if case.stage == "build":
        doc = json.loads(meta.read_text())
        assert doc["status"] == "failed"
        assert doc["error"] == error.detail  # the CLI's advice is not recorded
        assert not (meta.parent / "rootfs.ext4").exists()
    else:  # refused before a digest was known: nothing recorded
        assert list((data_dir / "images").rglob("metadata.json")) == []
    return True


def settled(condition: Callable[[], bool], timeout: float = 3.0) -> bool:
    """True once ``condition`` holds (server threads close their sockets asynchronously)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def outside_writes(tmp_path: Path, data_dir: Path) -> list[Path]:
    return [p for p in tmp_path.rglob("pwned*") if data_dir not in p.parents]


@pytest.mark.parametrize("build_case", CASES, ids=lambda b: b.__name__.replace("_", "-"))
def test_hostile_image(
    build_case: Callable[[Path], HostileCase],
    registry: RegistryServer,
    proxy: FaultProxy,
    data_dir: Path,
    canary: Path,
    tmp_path: Path,
    private_tmp: Path,
) -> None:
    case = build_case(canary)
    ref = install(case, registry, proxy)
    before_canary = snapshot(canary)
    host_passwd = hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()
    options = BuildOptions(limits=case.limits)

    fds, threads = open_fds(), threading.active_count()
    image: StoredImage | None = None
    error: BaseException | None = None
    with ImageManager(data_dir, options=options, client_factory=fast_client) as manager:
        tracemalloc.start()
        try:
            if case.error is None:
                image = manager.pull(ref)
            else:
                with pytest.raises(case.error) as caught:
                    manager.pull(ref)
                error = caught.value
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert _check_outcome(case, error, image, data_dir, proxy)
        assert store_problems(data_dir) == []
        manager.gc()

    # Contained: nothing outside the data dir changed.
    assert snapshot(canary) == before_canary
    assert outside_writes(tmp_path, data_dir) == []
    assert hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest() == host_passwd
    assert unexpected_paths(data_dir) == []
    assert store_problems(data_dir) == []
    # A failed build is garbage: gc removes its record and its blobs.
    if error is not None:
        assert list((data_dir / "cache" / "blobs" / "sha256").iterdir()) == []
        assert list((data_dir / "images").rglob("metadata.json")) == []

    # Nothing left growing.
    assert settled(lambda: len(open_fds()) <= len(fds)), sorted(open_fds() - fds)
    assert settled(lambda: threading.active_count() <= threads)
    assert list(private_tmp.iterdir()) == []
    assert peak < PEAK_BYTES, f"peak Python allocation {peak >> 20} MiB"


def test_corpus_in_one_data_dir_then_a_clean_pull(
    registry: RegistryServer,
    proxy: FaultProxy,
    alpine_ref: PushedImage,
    data_dir: Path,
    canary: Path,
) -> None:
    """All attacks against one data dir, twice (a retry of a failed build), then alpine works."""
    cases = [build(canary) for build in CASES]
    refs = [install(case, registry, proxy) for case in cases]
    with ImageManager(data_dir, client_factory=fast_client) as manager:
        for _round in range(2):
            for case, ref in zip(cases, refs, strict=True):
                options = BuildOptions(limits=case.limits)
                try:
                    manager.pull(ref, options=options)
                except HypemanError:
                    assert case.error is not None, case.name
                else:
                    assert case.error is None, case.name
        assert store_problems(data_dir, fsck=False) == []
        manager.gc()
        assert unexpected_paths(data_dir) == []
        good = manager.pull(f"{proxy.host}/{alpine_ref.repository}:{alpine_ref.tag}")
        assert good.record.status == "ready"
    assert store_problems(data_dir) == []


@pytest.mark.parametrize(
    ("build_case", "code", "names"),
    [
        (diff_id_mismatch, 7, "layer"),
        (gzip_claims_zstd_is, 7, "layer"),
        (long_number_in_manifest, 7, "manifest is not valid JSON"),
    ],
    ids=["diff-id-mismatch", "gzip-type-zstd-bytes", "long-number-in-manifest"],
)
def test_cli_names_the_cause_in_one_line(
    build_case: Callable[[Path], HostileCase],
    code: int,
    names: str,
    registry: RegistryServer,
    proxy: FaultProxy,
    data_dir: Path,
    canary: Path,
) -> None:
    case = build_case(canary)
    ref = install(case, registry, proxy)
    result = subprocess.run(
        [CLI, "pull", "--no-progress", "--data-dir", str(data_dir), ref],
        capture_output=True,
        text=True,
    )
    assert result.returncode == code, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("hypeman-images:")]
    assert len(errors) == 1 and names in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_entry_limit_counts_across_layers(
    registry: RegistryServer, proxy: FaultProxy, data_dir: Path, canary: Path
) -> None:
    """Two layers of 800 entries each pass a 1000-entry limit per layer but not per image."""
    from support.images import make_image, make_layer
    from support.tar import directory, file

    layers = [
        make_layer([directory(f"d{n}")] + [file(f"d{n}/{i}") for i in range(800)]) for n in (0, 1)
    ]
    case = HostileCase("entries-across-layers", make_image(layers), None, "")
    ref = install(case, registry, proxy)
    options = BuildOptions(limits=Limits(max_entries=1000))
    with (
        ImageManager(data_dir, options=options, client_factory=fast_client) as manager,
        pytest.raises(HypemanError, match=r"max_entries=1000"),
    ):
        manager.pull(ref)


def test_entry_limit_low_is_fast(
    registry: RegistryServer, proxy: FaultProxy, data_dir: Path, canary: Path
) -> None:
    """50,000 entries against a limit of 100: refused at entry 100, without reading the rest."""
    case = entry_flood(canary, count=50_000, limit=100)
    ref = install(case, registry, proxy)
    with ImageManager(
        data_dir, options=BuildOptions(limits=case.limits), client_factory=fast_client
    ) as manager:
        import time

        started = time.monotonic()
        with pytest.raises(HypemanError, match=r"max_entries=100"):
            manager.pull(ref)
        assert time.monotonic() - started < 10


# -- hostile API clients ---------------------------------------------------------------------

HOSTILE_NAMES = [
    "../../../etc/passwd",
    "..%2F..%2F..%2Fetc%2Fpasswd",
    "%2e%2e/%2e%2e/etc/passwd",
    "%252e%252e%252fetc%252fpasswd",
    "library/../../../../tmp/x",
    "/etc/passwd",
    "127.0.0.1:5000/../../../x:1",
    "a/./b",
    "a//b",
    "..",
    ".",
    "a\\..\\..\\b",
    "a%00b",
    "x" * 300,
    "\uff41\uff4c\uff50\uff49\uff4e\uff45",  # fullwidth "alpine"
    "alpine@sha256:../../../../../../../../etc/passwd",
    "alpine:" + "a" * 64,  # a tag the store could mistake for a digest
    "library/alpine:../../x",
]


@pytest.fixture
def api_server(data_dir: Path) -> Iterator[tuple[str, ImageManager]]:
    """The FastAPI app under uvicorn in a thread (raw paths reach it unnormalised)."""
    import uvicorn
    from support.registry import free_port

    from hypeman_images.service.api import create_app

    manager = ImageManager(data_dir, client_factory=fast_client)
    port = free_port()
    config = uvicorn.Config(
        create_app(manager, token="s3cret-token"), host="127.0.0.1", port=port, log_level="error"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert settled(lambda: server.started, timeout=10)
    try:
        yield f"127.0.0.1:{port}", manager
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        manager.close()


def raw_request(
    host: str, method: str, path: str, body: bytes | None = None, token: str = "s3cret-token"
) -> tuple[int, bytes]:
    """One request with the path sent byte for byte (no client-side normalisation)."""
    import http.client

    conn = http.client.HTTPConnection(host, timeout=30)
    try:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        from urllib.parse import quote

        path = "".join(c if ord(c) < 128 else quote(c) for c in path)  # http.client sends ASCII
        conn.putrequest(method, path, skip_host=False, skip_accept_encoding=True)
        for key, value in headers.items():
            conn.putheader(key, value)
        conn.putheader("Content-Length", str(len(body or b"")))
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def parses(name: str) -> bool:
    from hypeman_images.oci.reference import parse_reference

    try:
        parse_reference(name)
    except HypemanError:
        return False
    return True


def test_hostile_names_through_the_api(
    api_server: tuple[str, ImageManager],
    alpine_ref: PushedImage,
    data_dir: Path,
    canary: Path,
    tmp_path: Path,
) -> None:
    """``../`` and encoded variants: 400 or 404, never a 2xx or a 500, and nothing touched."""
    host, manager = api_server
    ready = manager.pull(alpine_ref.ref)
    before_canary, before_data = snapshot(canary), snapshot(data_dir)
    raw = {name.replace("%", "%25") for name in HOSTILE_NAMES}  # as typed, percent kept
    paths = sorted(raw | set(HOSTILE_NAMES))
    for name in paths:
        for method in ("GET", "DELETE"):
            status, body = raw_request(host, method, "/images/" + name)
            assert status in (400, 404, 405), (method, name, status, body)
        status, body = raw_request(host, "POST", "/images", json.dumps({"name": name}).encode())
        if parses(name):  # a valid name of an unreachable registry (Docker Hub here): 502
            assert status in (400, 404, 502), (name, status, body)
        else:
            assert status == 400, (name, status, body)
    assert snapshot(canary) == before_canary
    assert snapshot(data_dir) == before_data
    assert ready.disk.is_file()
    assert outside_writes(tmp_path, data_dir) == []


def test_bearer_token_checked_in_constant_time(
    api_server: tuple[str, ImageManager], monkeypatch: pytest.MonkeyPatch
) -> None:
    import hmac

    import hypeman_images.service.auth as auth

    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    host, _ = api_server
    for token, expected in (
        ("", 401),
        ("s3cret", 401),
        ("s3cret-tokeN", 401),
        ("s3cret-token", 200),
    ):
        status, _ = raw_request(host, "GET", "/images", token=token)
        assert status == expected, token
    assert len(calls) >= 3  # every non-empty token went through compare_digest


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_token_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    token = tmp_path / "token"
    token.write_text("secret-token\n")
    token.chmod(mode)
    from support.registry import free_port

    result = subprocess.run(
        [CLI, "serve", "--data-dir", str(tmp_path / "data"), "--token-file", str(token),
         "--listen", f"127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "chmod 600" in result.stderr
    assert "secret-token" not in result.stderr + result.stdout


# -- secrets -------------------------------------------------------------------------------


PASSWORD = "Hunter2-s3cr3t-9x7"


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    import httpx
    from support.images import make_image, make_layer, push_image
    from support.registry import htpasswd_auth, start_registry
    from support.tar import directory, file

    tmp = tmp_path_factory.mktemp("secret-registry")
    with start_registry(tmp, auth=htpasswd_auth(tmp, {"carol": PASSWORD})) as server:
        image = make_image([make_layer([directory("etc"), file("etc/motd", b"hi\n")])])
        with httpx.Client(auth=("carol", PASSWORD)) as pusher:
            push_image(server.url, "private/app", "v1", image, client=pusher)
        yield server


def test_no_secret_in_logs_errors_or_metadata(
    basic_registry: RegistryServer,
    data_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import base64
    import logging

    from hypeman_images.errors import Unauthorized
    from hypeman_images.registry.credentials import default_credentials
    from hypeman_images.registry.login import login

    secrets = [
        PASSWORD,
        base64.b64encode(f"carol:{PASSWORD}".encode()).decode(),
        base64.urlsafe_b64encode(f"carol:{PASSWORD}".encode()).decode(),
    ]
    good, bad = tmp_path / "good", tmp_path / "bad"
    login(basic_registry.host, "carol", PASSWORD, config_path=good / "config.json")
    login(basic_registry.host, "carol", PASSWORD + "-wrong", config_path=bad / "config.json")
    ref = f"{basic_registry.host}/private/app:v1"
    caplog.set_level(logging.DEBUG)
    messages = []

    def factory(config_dir: Path) -> Callable[[], RegistryClient]:
        credentials = default_credentials({"DOCKER_CONFIG": str(config_dir)})
        return lambda: RegistryClient(
            credentials=credentials, config=RegistryConfig(backoff_base=0.0, max_attempts=2)
        )

    with ImageManager(data_dir, client_factory=factory(good)) as manager:
        image = manager.pull(ref)
        assert image.record.status == "ready"
        messages.append(json.dumps([i.__dict__ for i in manager.list()], default=str))
    with ImageManager(data_dir, client_factory=factory(bad)) as manager:
        with pytest.raises(Unauthorized) as caught:
            manager.pull(ref)
        messages.append(str(caught.value))
    haystacks = [caplog.text, *messages]
    for path in data_dir.rglob("*"):
        if path.is_file() and path.name != "rootfs.ext4":
            haystacks.append(path.read_bytes().decode(errors="replace"))
    for secret in secrets:
        for text in haystacks:
            assert secret not in text


# -- a million entries -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_million_tiny_entries(registry: RegistryServer, data_dir: Path) -> None:
    """1,000,000 empty files (9 MiB of gzip): converted within the default limits.

    Runs the CLI in a subprocess to measure its peak RSS: memory grows with
    the entry count (at the peak, the planning beside the scans and the tree;
    the figures are in docs/performance.md), which is what
    ``Limits.max_entries`` bounds.
    The layer inflates ~110x, past the one pass's sizing: its gzip trailer
    says so as soon as the blob is whole, and the pass falls back at once.
    """
    from support.hostile import million_entries_layer
    from support.images import Layer, make_image, push_image

    blob, diff_id, entries = million_entries_layer(1_000_000)
    layer = Layer(blob, b"", "application/vnd.oci.image.layer.v1.tar+gzip")
    image = make_image([layer], config_extra={"rootfs": {"type": "layers", "diff_ids": [diff_id]}})
    push_image(registry.url, "hostile/million", "v1", image)
    measure = (
        "import resource, subprocess, sys\n"
        "rc = subprocess.run(sys.argv[1:]).returncode\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", measure, CLI, "pull", "-v", "--no-progress", "--data-dir",
         str(data_dir), f"{registry.host}/hostile/million:v1"],
        capture_output=True, text=True,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    peak_kib = int(result.stderr.strip().splitlines()[-1])
    print(f"1M entries: {elapsed:.1f} s, peak RSS {peak_kib >> 10} MiB")
    assert peak_kib < 800 * 1024, f"peak RSS {peak_kib >> 10} MiB"
    assert "building in two passes" in result.stderr and "its blob says at least" in result.stderr
    disk = Path(result.stdout.strip())
    counts = subprocess.run(["dumpe2fs", "-h", str(disk)], capture_output=True, text=True).stdout
    inodes = int(re.search(r"Inode count:\s+(\d+)", counts)[1])  # type: ignore[index]
    free = int(re.search(r"Free inodes:\s+(\d+)", counts)[1])  # type: ignore[index]
    assert inodes - free >= entries
    assert store_problems(data_dir, fsck=False) == []  # the build ran e2fsck -fn already
