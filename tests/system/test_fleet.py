"""A fleet: two data dirs as two hosts, one registry between them, disks shared as artifacts.

Host A builds and pushes; host B, with the same ``--disk-cache``, gets the
byte-identical disk without downloading a single layer (the fault proxy in
front of the registry counts every request), and a record equal to A's but
for where the disk came from. Two hosts pushing the same disk at once leave a
valid referrers index. The hostile and broken artifacts, the cache repository
refusing or failing, and a fetch killed half-way are in test_fleet_faults.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest
from support.disk import e2fsck_clean
from support.faultproxy import fault_proxy
from support.fleet import cache_repo, index_of
from support.hosts import host, record_of, shared_part, temp_files, through
from support.pushed import PushedImage
from support.registry import RegistryServer
from support.service import CLI, serve_process, wait_for_status

from hypeman_images.build.metrics import parse
from hypeman_images.fleet.artifact import ARTIFACT_TYPE
from hypeman_images.fleet.cache import CacheMode
from hypeman_images.oci.digest import Digest


def test_a_disk_built_once_is_fetched_by_another_host_without_its_layers(
    registry: RegistryServer,
    multilayer_ref: PushedImage,
    alpine_ref: PushedImage,
    tmp_path: Path,
) -> None:
    repo = cache_repo(registry.host, "two-hosts")
    images = (multilayer_ref, alpine_ref)
    with host(tmp_path / "a", repo) as a:
        built = [a.pull(image.ref) for image in images]
    assert [s.record.source for s in built] == ["build", "build"]
    metrics = parse(a.metrics.render(a.gauges()))
    assert metrics['hypeman_images_disk_cache_lookups_total{result="miss"}'] == 2
    assert metrics['hypeman_images_disk_cache_pushes_total{outcome="success"}'] == 2
    assert metrics['hypeman_images_disk_cache_bytes_total{direction="pushed"}'] > 0

    with (
        fault_proxy(registry.url) as proxy,
        host(tmp_path / "b", repo, config=through(proxy.host, registry.host)) as b,
    ):
        fetched = [b.pull(image.ref) for image in images]
        checked = [b.verify(image.ref) for image in images]
        metrics = parse(b.metrics.render(b.gauges()))
    for image, one, other in zip(images, built, fetched, strict=True):
        assert other.disk.read_bytes() == one.disk.read_bytes(), image.ref
        mine, theirs = record_of(one.disk), record_of(other.disk)
        assert shared_part(theirs) == shared_part(mine), image.ref
        assert theirs["source"] == "disk-cache" and theirs["source_repository"] == repo.name
        assert Digest.parse(theirs["source_artifact"])
        layers = [layer.digest for layer in image.image.layers]
        assert all(proxy.requests(f"/blobs/{digest}") == [] for digest in layers), image.ref
        assert proxy.requests(f"/v2/{repo.repository}/blobs/"), "the chunks came from the cache"
    assert [c.recorded for c in checked] == [r.record.disk_sha256 for r in built]
    assert metrics['hypeman_images_disk_cache_lookups_total{result="hit"}'] == 2
    assert metrics['hypeman_images_disk_cache_bytes_total{direction="fetched"}'] > 0
    assert metrics['hypeman_images_disk_cache_pushes_total{outcome="success"}'] == 0
    assert temp_files(tmp_path / "b") == []


def test_pull_only_and_push_only_hosts(
    registry: RegistryServer, alpine_ref: PushedImage, tmp_path: Path
) -> None:
    repo = cache_repo(registry.host, "modes")
    with host(tmp_path / "reader", repo, mode=CacheMode.PULL) as reader:
        assert reader.pull(alpine_ref.ref).record.source == "build"
    assert index_of(registry.url, repo, Digest.parse(alpine_ref.manifest_digest)) is None
    with host(tmp_path / "writer", repo, mode=CacheMode.PUSH) as writer:
        writer.pull(alpine_ref.ref)
        metrics = parse(writer.metrics.render(writer.gauges()))
    assert 'hypeman_images_disk_cache_lookups_total{result="miss"}' in metrics
    assert metrics['hypeman_images_disk_cache_lookups_total{result="miss"}'] == 0
    with host(tmp_path / "third", repo, mode=CacheMode.PULL) as third:
        assert third.pull(alpine_ref.ref).record.source == "disk-cache"


def test_two_hosts_pushing_the_same_disk_at_once_keep_the_index_valid(
    registry: RegistryServer, alpine_ref: PushedImage, tmp_path: Path
) -> None:
    repo = cache_repo(registry.host, "same-disk")
    for name in ("a", "b"):
        with host(tmp_path / name, None) as manager:
            manager.pull(alpine_ref.ref)
    # Two CLI processes, started together: each reads the fallback index and writes it back.
    argv = ["disk", "push", "--json", "--disk-cache", repo.name, alpine_ref.ref]
    pushers = [
        subprocess.Popen(
            [CLI, *argv, "--data-dir", str(tmp_path / name)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    outputs = [pusher.communicate(timeout=120) for pusher in pushers]
    assert [p.returncode for p in pushers] == [0, 0], outputs
    pushed = [json.loads(out) for out, _ in outputs]
    assert pushed[0]["digest"] == pushed[1]["digest"], "the same disk is the same artifact"
    index = index_of(registry.url, repo, Digest.parse(alpine_ref.manifest_digest))
    assert index is not None and index["schemaVersion"] == 2
    entries = [e for e in index["manifests"] if e["digest"] == pushed[0]["digest"]]
    assert len(entries) == 1 and entries[0]["artifactType"] == ARTIFACT_TYPE

    with host(tmp_path / "c", repo, mode=CacheMode.PULL) as reader:
        got = reader.pull(alpine_ref.ref)
    assert got.record.source_artifact == pushed[0]["digest"]
    e2fsck_clean(got.disk)


def test_serve_takes_the_disk_cache_and_counts_it(
    registry: RegistryServer, busybox_ref: PushedImage, tmp_path: Path
) -> None:
    repo = cache_repo(registry.host, "serve")
    with host(tmp_path / "a", repo, mode=CacheMode.PUSH) as a:
        a.pull(busybox_ref.ref)
    log = tmp_path / "serve.log"
    with (
        serve_process(tmp_path / "b", log, "--disk-cache", repo.name) as served,
        httpx.Client(timeout=30) as client,
    ):
        posted = client.post(f"{served.url}/images", json={"name": busybox_ref.ref})
        assert posted.status_code == 202, posted.text
        ready = wait_for_status(client, served.url, busybox_ref.ref, {"ready", "failed"})
        assert ready["status"] == "ready", ready["error"]
        metrics = parse(client.get(f"{served.url}/metrics").text)
    assert metrics['hypeman_images_disk_cache_lookups_total{result="hit"}'] == 1
    assert metrics["hypeman_images_pulled_bytes_total"] == 0, "no layer was downloaded"
    [disk] = (tmp_path / "b").rglob("rootfs.ext4")
    assert record_of(disk)["source"] == "disk-cache"


@pytest.mark.slow
def test_the_fetched_disk_boots(
    registry: RegistryServer, alpine_ref: PushedImage, tmp_path: Path
) -> None:
    repo = cache_repo(registry.host, "boot")
    cache = ("--disk-cache", repo.name)
    built = subprocess.run(
        [CLI, "pull", "--data-dir", str(tmp_path / "a"), *cache, alpine_ref.ref],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    run = subprocess.run(
        [CLI, "boot", "--data-dir", str(tmp_path / "b"), "--timeout", "90", *cache,
         alpine_ref.ref, "--", "cat", "/etc/alpine-release"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout == "3.20.3\n"
    assert "fetching: disk" in run.stderr
    shown = subprocess.run(
        [CLI, "list", "--data-dir", str(tmp_path / "b")], capture_output=True, text=True
    )
    assert "disk-cache" in shown.stdout.splitlines()[1], shown.stdout
