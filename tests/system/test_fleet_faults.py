"""A disk cache that lies, refuses or dies: every pull still ends with a good disk.

Hostile and broken artifacts (a chunk whose bytes are not its digest's, a
config that claims another sha256 or other run-time fields, a disk that fails
``e2fsck -fn``) and a cache repository that answers 401, 403, 500 or loses
its blobs are put in front of host B, which must build the image itself after
one warning line, count the fallback by its reason, and keep its store
consistent: a ready record of a built disk, nothing half-made. A fetch killed
half-way (the fault proxy trickles a chunk, the CLI gets ``kill -9``) leaves a
temp disk that recovery or the next pull removes before finishing the job.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from support.disk import e2fsck_clean
from support.faultproxy import Fault, FaultProxy, fault_proxy
from support.fleet import CHUNK, FAST, cache_repo, chunks_of, forge
from support.hosts import host, record_of, temp_files
from support.pushed import PushedImage
from support.registry import RegistryServer
from support.service import CLI

from hypeman_images.build.diskcache import recorded_recipe
from hypeman_images.build.metrics import parse
from hypeman_images.fleet.artifact import ARTIFACT_TYPE, annotations_for
from hypeman_images.fleet.cache import CacheMode
from hypeman_images.fleet.config import DiskConfig, Runtime
from hypeman_images.fleet.pack import compress_chunk
from hypeman_images.fleet.push import push_disk
from hypeman_images.fleet.recipe import Recipe
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.reference import Reference
from hypeman_images.oci.spec import OCI_INDEX, OCI_MANIFEST, Descriptor
from hypeman_images.registry.client import RegistryClient
from hypeman_images.registry.push import put_manifest
from hypeman_images.registry.referrers import fallback_tag


@dataclass(frozen=True)
class Built:
    """Host A's build of alpine: what an honest artifact of it is made of."""

    disk: bytes
    path: Path
    subject: Descriptor
    recipe: Recipe
    runtime: Runtime


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, alpine_ref: PushedImage) -> Built:
    data = tmp_path_factory.mktemp("host-a")
    with host(data, None) as a:
        stored = a.pull(alpine_ref.ref)
    record = stored.record
    digest = Digest.parse(record.digest)
    assert record.manifest_media_type is not None
    size = a.blobs.path(digest).stat().st_size
    subject = Descriptor(record.manifest_media_type, digest, size)
    return Built(
        stored.disk.read_bytes(), stored.disk, subject, recorded_recipe(record),
        Runtime.from_record(record),
    )  # fmt: skip


@pytest.fixture
def client() -> Iterator[RegistryClient]:
    with RegistryClient(config=FAST) as c:
        yield c


def honest(client: RegistryClient, repo: Reference, built: Built) -> list[Digest]:
    """Push A's disk to ``repo`` as A would; the chunk blobs' digests."""
    pushed = push_disk(
        client, repo, built.path, built.subject, built.recipe, built.runtime, settle=0.1
    )
    return [chunk.blob.digest for chunk in pushed.artifact.chunks]


def forged(
    client: RegistryClient, repo: Reference, built: Built, disk: bytes, **config: object
) -> None:
    """Push ``disk`` under A's recipe tag, its config changed by ``config``."""
    honest_config = DiskConfig(built.recipe, built.runtime, len(disk), Digest.of(disk), CHUNK)
    pieces = chunks_of(disk, CHUNK)
    forge(
        client, repo, built.subject, replace(honest_config, **config),
        [compress_chunk(p) for p in pieces], [len(p) for p in pieces], tag=built.recipe.tag,
    )  # fmt: skip


def unfsckable(built: Built, work: Path) -> bytes:
    """A's disk with its root inode cleared: an ext4 that e2fsck -fn rejects."""
    copy = work / "broken.ext4"
    shutil.copyfile(built.path, copy)
    subprocess.run(["debugfs", "-w", "-R", "clri <2>", str(copy)], check=True, capture_output=True)
    return copy.read_bytes()


def build_despite(
    proxy: FaultProxy,
    repo: Reference,
    image: PushedImage,
    data: Path,
    caplog: pytest.LogCaptureFixture,
) -> dict[str, float]:
    """Host B pulls ``image`` with the cache behind ``proxy``: built here, one warning."""
    cache = Reference(proxy.host, repo.repository)
    caplog.clear()
    with caplog.at_level(logging.WARNING), host(data, cache) as b:
        stored = b.pull(image.ref)
    metrics = parse(b.metrics.render(b.gauges()))  # once closed: pushes are done
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert f"disk cache {cache.name}: " in warnings[0].getMessage()
    assert "building" in warnings[0].getMessage()
    record = record_of(stored.disk)
    assert record["status"] == "ready" and record["source"] == "build"
    assert sorted(p.name for p in stored.directory.iterdir()) == [
        ".lock", "metadata.json", "rootfs.ext4",
    ]  # fmt: skip
    e2fsck_clean(stored.disk)
    assert temp_files(data) == []
    assert metrics['hypeman_images_disk_cache_lookups_total{result="fallback"}'] == 1
    return metrics


def fallbacks(metrics: dict[str, float]) -> dict[str, float]:
    prefix = "hypeman_images_disk_cache_fallbacks_total{reason="
    return {k[len(prefix) + 1 : -2]: v for k, v in metrics.items() if k.startswith(prefix)}


def test_a_chunk_whose_bytes_are_not_its_digest(
    registry: RegistryServer, alpine_ref: PushedImage, built: Built, client: RegistryClient,
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    repo = cache_repo(registry.host, "corrupt-chunk")
    first = honest(client, repo, built)[0]
    with fault_proxy(registry.url) as proxy:
        proxy.add(Fault(f"/blobs/{first}", "corrupt", after_bytes=100))
        metrics = build_despite(proxy, repo, alpine_ref, tmp_path / "b", caplog)
    assert fallbacks(metrics) == {"digest_mismatch": 1}


@pytest.mark.parametrize("lie", ["another-sha256", "another-runtime", "fails-fsck"])
def test_an_artifact_that_lies(
    lie: str, registry: RegistryServer, alpine_ref: PushedImage, built: Built,
    client: RegistryClient, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    repo = cache_repo(registry.host, lie)
    if lie == "another-sha256":
        forged(client, repo, built, built.disk, disk_sha256=Digest.of(b"another disk"))
    elif lie == "another-runtime":
        runtime = replace(built.runtime, entrypoint=("/bin/evil",))
        forged(client, repo, built, built.disk, runtime=runtime)
    else:
        forged(client, repo, built, unfsckable(built, tmp_path))
    with fault_proxy(registry.url) as proxy:
        metrics = build_despite(proxy, repo, alpine_ref, tmp_path / "b", caplog)
    assert fallbacks(metrics) == {"invalid_disk_artifact": 1}
    # B pushed its own build over the lie: the next host gets a good disk.
    assert metrics['hypeman_images_disk_cache_pushes_total{outcome="success"}'] == 1
    with host(tmp_path / "c", repo, mode=CacheMode.PULL) as c:
        assert c.pull(alpine_ref.ref).disk.read_bytes() == built.disk


LONG_NUMBER = b"9" * 5000  # past int()'s digit limit: json.loads raised a bare ValueError


@pytest.mark.parametrize(
    ("where", "reason"),
    # The artifact is read as any manifest is (oci.spec: a malformed document, bad_layer).
    [("artifact", "bad_layer"), ("index", "registry_error")],
)
def test_a_document_with_a_number_no_parser_takes(
    where: str, reason: str, registry: RegistryServer, alpine_ref: PushedImage, built: Built,
    client: RegistryClient, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """docker-registry stores a manifest or index with a field it does not know, whatever
    number it holds; the lookup must refuse it as a bad document, not crash the pull."""
    repo = cache_repo(registry.host, f"long-number-{where}")
    config = DiskConfig(built.recipe, built.runtime, len(built.disk), Digest.of(built.disk), CHUNK)
    pieces = chunks_of(built.disk, CHUNK)
    blobs, sizes = [compress_chunk(p) for p in pieces], [len(p) for p in pieces]
    if where == "artifact":  # under the recipe's tag, where a lookup reads first
        real = forge(client, repo, built.subject, config, blobs, sizes, fields={"x": "N"})
        data = real.manifest.replace(b'"x":"N"', b'"x":' + LONG_NUMBER)
        put_manifest(client, repo, built.recipe.tag, data, OCI_MANIFEST)
    else:  # the subject's referrers index (the tag schema's), listing a sound artifact
        real = forge(client, repo, built.subject, config, blobs, sizes)
        entry = {"mediaType": OCI_MANIFEST, "digest": str(real.digest), "size": len(real.manifest),
                 "artifactType": ARTIFACT_TYPE, "annotations": annotations_for(config)}  # fmt: skip
        index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry],
                            "x": "N"}).encode()  # fmt: skip
        data = index.replace(b'"x": "N"', b'"x": ' + LONG_NUMBER)
        put_manifest(client, repo, fallback_tag(built.subject.digest), data, OCI_INDEX)
    with fault_proxy(registry.url) as proxy:
        metrics = build_despite(proxy, repo, alpine_ref, tmp_path / "b", caplog)
    assert fallbacks(metrics) == {reason: 1}
    said = caplog.records[-1].getMessage()
    assert "not valid JSON" in said and "more than 4300 digits" in said, said
    assert "not writing over it" not in said  # a lookup reads; it writes nothing


@pytest.mark.parametrize(
    ("status", "reason"),
    [(401, "registry_unauthorized"), (403, "registry_unauthorized"), (500, "registry_unavailable")],
)
def test_a_cache_repository_that_refuses_or_fails(
    status: int, reason: str, registry: RegistryServer, alpine_ref: PushedImage,
    built: Built, client: RegistryClient, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    repo = cache_repo(registry.host, f"status-{status}")
    honest(client, repo, built)
    with fault_proxy(registry.url) as proxy:
        proxy.add(Fault(f"/v2/{repo.repository}/", "status", method=None, status=status))
        metrics = build_despite(proxy, repo, alpine_ref, tmp_path / "b", caplog)
    assert fallbacks(metrics) == {reason: 1}
    # Nothing is pushed to a repository that refused or failed: it would only fail again.
    assert metrics['hypeman_images_disk_cache_pushes_total{outcome="failure"}'] == 0
    assert all(r.method == "GET" for r in proxy.log), "no HEAD, POST or PUT"


def test_a_chunk_missing_from_the_cache(
    registry: RegistryServer, alpine_ref: PushedImage, built: Built, client: RegistryClient,
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    repo = cache_repo(registry.host, "missing-chunk")
    first = honest(client, repo, built)[0]
    with fault_proxy(registry.url) as proxy:
        proxy.add(Fault(f"/v2/{repo.repository}/blobs/{first}", "status", status=404))
        metrics = build_despite(proxy, repo, alpine_ref, tmp_path / "b", caplog)
    assert fallbacks(metrics) == {"not_found": 1}


def test_an_empty_cache_is_a_miss_not_a_failure(
    registry: RegistryServer, alpine_ref: PushedImage, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    repo = cache_repo(registry.host, "empty")
    with caplog.at_level(logging.WARNING), host(tmp_path / "b", repo, mode=CacheMode.PULL) as b:
        assert b.pull(alpine_ref.ref).record.source == "build"
        metrics = parse(b.metrics.render(b.gauges()))
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert metrics['hypeman_images_disk_cache_lookups_total{result="miss"}'] == 1


def _killed_mid_fetch(
    proxy: FaultProxy, data: Path, cache: Reference, image: PushedImage, chunk: Digest, log: Path
) -> Path:
    """A CLI ``pull`` whose fetch of ``chunk`` trickles, ``kill -9``ed; its build dir."""
    proxy.add(Fault(f"/blobs/{chunk}", "stall", after_bytes=4096, delay=120))
    with log.open("wb") as out:
        process = subprocess.Popen(
            [CLI, "pull", "--no-progress", "--data-dir", str(data), "--disk-cache", cache.name,
             image.ref],
            stdout=out, stderr=out, start_new_session=True,
        )  # fmt: skip
    directory = data / "images" / image.registry.host / image.repository
    directory = directory / image.manifest_digest[7:]
    try:
        deadline = time.monotonic() + 60
        while not any(r.action == "stall" for r in proxy.requests(f"/blobs/{chunk}")):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert temp_files(data), "the fetch writes a temp disk beside rootfs.ext4"
    finally:
        os.killpg(process.pid, 9)
        process.wait(10)
    proxy.clear()
    assert record_of(directory / "rootfs.ext4")["status"] == "pulling"
    assert not (directory / "rootfs.ext4").exists()
    return directory


@pytest.mark.parametrize("then", ["pull", "recover"])
def test_a_fetch_killed_half_way(
    then: str, registry: RegistryServer, alpine_ref: PushedImage, built: Built,
    client: RegistryClient, tmp_path: Path,
) -> None:  # fmt: skip
    repo = cache_repo(registry.host, f"killed-{then}")
    chunk = honest(client, repo, built)[0]
    data = tmp_path / "b"
    with fault_proxy(registry.url) as proxy:
        cache = Reference(proxy.host, repo.repository)
        directory = _killed_mid_fetch(proxy, data, cache, alpine_ref, chunk, tmp_path / "log")
        if then == "pull":
            again = subprocess.run(
                [CLI, "pull", "--data-dir", str(data), "--disk-cache", cache.name,
                 alpine_ref.ref], capture_output=True, text=True,
            )  # fmt: skip
            assert again.returncode == 0, again.stderr
        else:
            with host(data, cache) as b:
                assert len(b.recover().resumed) == 1
                b.wait(alpine_ref.digest_ref)
    record = record_of(directory / "rootfs.ext4")
    assert record["status"] == "ready" and record["source"] == "disk-cache"
    assert (directory / "rootfs.ext4").read_bytes() == built.disk
    assert temp_files(data) == []
    assert sorted(p.name for p in directory.iterdir()) == [".lock", "metadata.json", "rootfs.ext4"]


@pytest.mark.parametrize(("status", "why"), [(403, "denied"), (507, "full")])
def test_a_push_refused_is_a_warning_and_a_metric(
    status: int, why: str, registry: RegistryServer, alpine_ref: PushedImage, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    repo = cache_repo(registry.host, f"push-{why}")
    with fault_proxy(registry.url) as proxy:
        proxy.add(Fault(f"/v2/{repo.repository}/blobs/uploads", "status", "POST", status=status))
        cache = Reference(proxy.host, repo.repository)
        with caplog.at_level(logging.WARNING), host(tmp_path / "b", cache) as b:
            stored = b.pull(alpine_ref.ref)
            assert stored.record.status == "ready"  # before the push is even tried
    metrics = parse(b.metrics.render(b.gauges()))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "was not pushed" in warnings[0], warnings
    assert metrics['hypeman_images_disk_cache_pushes_total{outcome="failure"}'] == 1
    assert metrics['hypeman_images_disk_cache_lookups_total{result="miss"}'] == 1
    assert record_of(stored.disk)["status"] == "ready"
    e2fsck_clean(stored.disk)
