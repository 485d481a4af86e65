"""Referrers: the API where a registry has it, and the tag-schema index clients keep where not.

distribution 2.8 has no Referrers API and no conditional PUT, so the index
under ``<alg>-<hex>`` is a read-modify-write that other writers can undo;
these tests race real writers against the real registry, and make the lost
update happen on purpose (a proxy that holds one writer's PUT back).
"""

from __future__ import annotations

import json
import multiprocessing
import re
import threading
from dataclasses import replace
from typing import Any

import httpx
import pytest
from support.faultproxy import Fault, fault_proxy
from support.fleet import FAST, add_in_process, cache_repo, index_of, referrer_in, subject_for
from support.registry import RegistryServer

from hypeman_images.errors import RegistryError
from hypeman_images.oci.reference import Reference
from hypeman_images.oci.spec import OCI_INDEX, OCI_MANIFEST
from hypeman_images.registry.client import RegistryClient
from hypeman_images.registry.referrers import (
    add_referrer,
    fallback_tag,
    list_referrers,
)


@pytest.fixture
def repo(registry: RegistryServer, request: pytest.FixtureRequest) -> Reference:
    return cache_repo(registry.host, request.node.name)


@pytest.fixture
def client() -> Any:
    with RegistryClient(config=FAST) as c:
        yield c


def test_the_fallback_tag_is_alg_dash_hex() -> None:
    subject = subject_for("x").digest
    assert fallback_tag(subject) == f"sha256-{subject.encoded}"


def test_add_creates_the_index_once_and_lists_it(
    client: RegistryClient, repo: Reference, registry: RegistryServer
) -> None:
    subject = subject_for().digest
    entry = referrer_in(registry.url, repo, "one")
    with fault_proxy(registry.url) as proxy:
        proxied = replace(repo, registry=proxy.host)
        with RegistryClient(config=FAST) as c:
            assert add_referrer(c, proxied, subject, entry, settle=0.05)
            assert add_referrer(c, proxied, subject, entry, settle=0.05)  # already there
        puts = proxy.requests(f"/manifests/{fallback_tag(subject)}", "PUT")
    assert len(puts) == 1
    index = index_of(registry.url, repo, subject)
    assert index == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry.to_json()]}
    listing = list_referrers(client, repo, subject)
    assert listing.source == "tag" and listing.entries == (entry,)
    assert list_referrers(client, repo, subject, "application/other").entries == ()
    assert list_referrers(client, repo, subject_for().digest).entries == ()


def test_entries_it_read_are_kept_as_they_were(
    client: RegistryClient, repo: Reference, registry: RegistryServer
) -> None:
    subject = subject_for().digest
    foreign = referrer_in(registry.url, repo, "signature").to_json()
    foreign |= {"platform": {"os": "linux", "architecture": "amd64"}, "x-unknown": [1, {"a": None}]}
    first = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [foreign],
             "annotations": {"org.example": "kept"}}  # fmt: skip
    url = f"{registry.url}/v2/{repo.repository}/manifests/{fallback_tag(subject)}"
    put = httpx.put(url, content=json.dumps(first), headers={"Content-Type": OCI_INDEX})
    assert put.status_code == 201, put.text
    entry = referrer_in(registry.url, repo, "disk")
    assert add_referrer(client, repo, subject, entry, settle=0.05)
    assert index_of(registry.url, repo, subject) == {
        **first, "manifests": [foreign, entry.to_json()],
    }  # fmt: skip


@pytest.mark.parametrize(
    ("body", "says"),
    [
        pytest.param(b"not json", "not valid JSON", id="not-json"),
        pytest.param(json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                 "config": {}, "layers": []}).encode(),
                     "not the OCI index", id="an-image-manifest"),
        pytest.param(json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                 "manifests": [{"digest": "sha256:zz", "size": -1}]}).encode(),
                     "malformed descriptors at [0]", id="malformed-entry"),
        pytest.param(json.dumps({"schemaVersion": 1, "manifests": []}).encode(),
                     "schemaVersion 1", id="schema-1"),
    ],
)  # fmt: skip
def test_an_index_it_cannot_read_is_never_written_over(
    repo: Reference, registry: RegistryServer, body: bytes, says: str
) -> None:
    subject = subject_for().digest
    entry = referrer_in(registry.url, repo, "disk")
    tag = fallback_tag(subject)
    with fault_proxy(registry.url) as proxy:
        proxy.add(Fault(f"/manifests/{tag}", "replace", status=200, body=body,
                        headers={"Content-Type": OCI_INDEX}))  # fmt: skip
        with RegistryClient(config=FAST) as c, pytest.raises(RegistryError, match=re.escape(says)):
            add_referrer(c, replace(repo, registry=proxy.host), subject, entry, settle=0)
        assert proxy.requests(f"/manifests/{tag}", "PUT") == []
        # A lookup skips what it cannot use instead of failing.
        with RegistryClient(config=FAST) as c:
            if says.startswith("malformed"):
                assert list_referrers(c, replace(repo, registry=proxy.host), subject).entries == ()


def _race(
    registry: RegistryServer, repo: Reference, settle: float
) -> tuple[list[bool], dict[str, Any]]:
    """Two writers read the empty index at once; their PUTs land 0.3 s and 0.8 s later."""
    subject = subject_for().digest
    tag = fallback_tag(subject)
    entries = [referrer_in(registry.url, repo, "early"), referrer_in(registry.url, repo, "late")]
    both_read = threading.Barrier(2)
    results: list[bool] = []

    def write(entry: Any, delay: float) -> None:
        with fault_proxy(registry.url) as proxy, RegistryClient(config=FAST) as c:
            proxy.add(Fault(f"/manifests/{tag}", "delay", method="PUT", delay=delay, times=1))
            both_read.wait()
            target = replace(repo, registry=proxy.host)
            results.append(add_referrer(c, target, subject, entry, settle=settle))

    threads = [
        threading.Thread(target=write, args=(entry, delay))
        for entry, delay in zip(entries, (0.3, 0.8), strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    index = index_of(registry.url, repo, subject)
    assert index is not None
    return results, {m["annotations"]["org.example.name"]: m for m in index["manifests"]}


def test_a_lost_update_is_repaired_once_the_index_settles(
    repo: Reference, registry: RegistryServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", "hypeman_images.registry.referrers")
    results, listed = _race(registry, repo, settle=1.2)
    assert results == [True, True] and sorted(listed) == ["early", "late"]
    assert "lost entry" in caplog.text  # the late PUT did drop the first entry for a while


def test_without_settling_the_late_writer_wins(repo: Reference, registry: RegistryServer) -> None:
    """Why settle exists (and why artifacts keep a tag of their own besides)."""
    results, listed = _race(registry, repo, settle=0.0)
    assert results == [True, True] and list(listed) == ["late"]


def test_many_writers_at_once_all_stay(repo: Reference, registry: RegistryServer) -> None:
    subject = subject_for().digest
    entries = [referrer_in(registry.url, repo, f"e{i}") for i in range(6)]
    entries.append(entries[0])  # the same entry from two writers
    start = threading.Barrier(len(entries))
    results: list[bool] = []

    def write(entry: Any) -> None:
        with RegistryClient(config=FAST) as c:
            start.wait()
            results.append(add_referrer(c, repo, subject, entry, settle=1.0, attempts=20))

    threads = [threading.Thread(target=write, args=(e,)) for e in entries]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [True] * len(entries)
    index = index_of(registry.url, repo, subject)
    assert index is not None
    listed = [m["digest"] for m in index["manifests"]]
    assert sorted(listed) == sorted({str(e.digest) for e in entries})


def test_writers_in_two_processes_all_stay(repo: Reference, registry: RegistryServer) -> None:
    subject = subject_for().digest
    entries = [referrer_in(registry.url, repo, f"p{i}") for i in range(4)]
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        args = [(repo.registry, repo.repository, str(subject), e.to_json()) for e in entries]
        results = pool.starmap(add_in_process, args)
    assert results == [True] * 4
    index = index_of(registry.url, repo, subject)
    assert index is not None
    assert sorted(m["digest"] for m in index["manifests"]) == sorted(str(e.digest) for e in entries)


def test_the_api_answer_is_used_page_by_page(repo: Reference, registry: RegistryServer) -> None:
    subject = subject_for().digest
    one, two = referrer_in(registry.url, repo, "1"), referrer_in(registry.url, repo, "2")
    page = lambda *e: json.dumps(  # noqa: E731
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [x.to_json() for x in e]}
    ).encode()
    link = f'</v2/{repo.repository}/referrers/{subject}?last=1>; rel="next"'
    with fault_proxy(registry.url) as proxy:
        proxy.add(Fault("last=1", "replace", status=200, body=page(two),
                        headers={"Content-Type": OCI_INDEX}))  # fmt: skip
        proxy.add(Fault("/referrers/", "replace", status=200, body=page(one),
                        headers={"Content-Type": OCI_INDEX, "Link": link}))  # fmt: skip
        with RegistryClient(config=FAST) as c:
            listing = list_referrers(c, replace(repo, registry=proxy.host), subject)
    assert listing.source == "api" and listing.entries == (one, two)


def test_a_next_page_that_is_no_url_is_a_registry_error(
    repo: Reference, registry: RegistryServer
) -> None:
    subject = subject_for().digest
    page = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()
    headers = {"Content-Type": OCI_INDEX, "Link": '<http://[::1/next>; rel="next"'}
    with fault_proxy(registry.url) as proxy, RegistryClient(config=FAST) as c:
        proxy.add(Fault("/referrers/", "replace", status=200, body=page, headers=headers))
        with pytest.raises(RegistryError, match=r"next page of the referrers .* not a URL"):
            list_referrers(c, replace(repo, registry=proxy.host), subject)


def test_a_read_that_meets_a_torn_tag_is_read_again(
    repo: Reference, registry: RegistryServer
) -> None:
    """distribution 2.8 rewrites a tag's link in place: a racing read gets a 500 (seen under
    the many-writers test); the update reads again instead of failing or writing blind."""
    subject = subject_for().digest
    entry = referrer_in(registry.url, repo, "disk")
    tag = fallback_tag(subject)
    with fault_proxy(registry.url) as proxy, RegistryClient(config=FAST) as c:
        proxy.add(Fault(f"/manifests/{tag}", "status", status=500, times=2))  # FAST: 2 tries
        assert add_referrer(c, replace(repo, registry=proxy.host), subject, entry, settle=0)
        assert len(proxy.requests(f"/manifests/{tag}", "PUT")) == 1
    index = index_of(registry.url, repo, subject)
    assert index is not None and index["manifests"] == [entry.to_json()]
