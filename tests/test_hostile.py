"""Hostile images: every attack in tests/support/hostile.py, pulled from a real registry.

For each case the pull must either fail with the error class and message the
case names, recorded in the digest's ``metadata.json`` (``status: failed``),
or -- for attacks the flattener neutralises by design -- succeed with the
attack contained in the disk. Either way:

- nothing is written outside the data dir (a canary dir the names aim at is
  unchanged, no ``pwned`` file appears anywhere under the test's tmp dir);
- the data dir holds only the layout DESIGN.md describes, and it is
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
    entry_flood,
    gzip_claims_zstd_is,
    diff_id_mismatch,
    open_fds,
    snapshot,
    store_problems,
    unexpected_paths,
)
from support.pushed import PushedImage
from support.registry import RegistryServer

from hypeman_images.config import BuildOptions
from hypeman_images.errors import HypemanError
from hypeman_images.flatten import Limits
from hypeman_images.manager import ImageManager
from hypeman_images.registries import RegistryConfig
from hypeman_images.registry import RegistryClient
from hypeman_images.store import StoredImage

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
        proxy.add(
            Fault(f"/v2/{repo}{fragment}", "replace", status=200, body=body, headers=headers)
        )
    return f"{proxy.host}/{repo}:v1"


def digest_dir(data_dir: Path, proxy: FaultProxy, case: HostileCase) -> Path:
    return data_dir / "images" / proxy.host / "hostile" / case.name / case.image.manifest_digest[7:]


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
        assert doc["error"] == error.message
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
    ("build_case", "code"),
    [(diff_id_mismatch, 7), (gzip_claims_zstd_is, 7)],
    ids=["diff-id-mismatch", "gzip-type-zstd-bytes"],
)
def test_cli_names_the_cause_in_one_line(
    build_case: Callable[[Path], HostileCase],
    code: int,
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
    assert len(errors) == 1 and "layer" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_entry_limit_counts_across_layers(
    registry: RegistryServer, proxy: FaultProxy, data_dir: Path, canary: Path
) -> None:
    """Two layers of 800 entries each pass a 1000-entry limit per layer but not per image."""
    from support.images import make_image, make_layer
    from support.tar import directory, file

    layers = [make_layer([directory(f"d{n}")] + [file(f"d{n}/{i}") for i in range(800)]) for n in (0, 1)]
    case = HostileCase("entries-across-layers", make_image(layers), None, "")
    ref = install(case, registry, proxy)
    options = BuildOptions(limits=Limits(max_entries=1000))
    with ImageManager(data_dir, options=options, client_factory=fast_client) as manager:
        with pytest.raises(HypemanError, match=r"max_entries=1000"):
            manager.pull(ref)


def test_entry_limit_low_is_fast(
    registry: RegistryServer, proxy: FaultProxy, data_dir: Path, canary: Path
) -> None:
    """50,000 entries against a limit of 100: refused at entry 100, without reading the rest."""
    case = entry_flood(canary, count=50_000, limit=100)
    ref = install(case, registry, proxy)
    with ImageManager(data_dir, options=BuildOptions(limits=case.limits), client_factory=fast_client) as manager:
        import time

        started = time.monotonic()
        with pytest.raises(HypemanError, match=r"max_entries=100"):
            manager.pull(ref)
        assert time.monotonic() - started < 10
