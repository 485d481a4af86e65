"""Disk artifacts for the fleet tests: small real ext4 disks, recipes, and forged artifacts.

:func:`forge` pushes an artifact whose every part the test chooses (chunk
blobs, config, manifest fields), through the project's own
``registry.push``, so hostile artifacts look exactly like real ones to the
registry and differ only in what the test broke.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from hypeman_images.fleet.artifact import (
    ARTIFACT_TYPE,
    CHUNK_TYPE,
    Chunk,
    DiskArtifact,
    annotations_for,
    build_artifact,
)
from hypeman_images.fleet.config import CONFIG_TYPE, DiskConfig, Runtime
from hypeman_images.fleet.pack import compress_chunk
from hypeman_images.fleet.recipe import DiskFormat, Recipe, canonical_json
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.reference import Reference
from hypeman_images.oci.spec import OCI_INDEX, OCI_MANIFEST, Descriptor
from hypeman_images.registry.client import RegistryClient
from hypeman_images.registry.config import RegistryConfig
from hypeman_images.registry.push import push_blob, put_manifest
from hypeman_images.registry.referrers import Referrer, add_referrer, fallback_tag

from . import push as independent

MiB = 1024 * 1024
FAST = RegistryConfig(backoff_base=0.0, max_attempts=2, resume_attempts=1)
CHUNK = MiB  # small chunks: a 12 MiB test disk makes 12 of them
RUNTIME = Runtime(
    entrypoint=("/bin/sh",),
    cmd=("-c", "echo hi"),
    env=("PATH=/usr/bin:/bin",),
    working_dir="/",
    labels={"org.example": "yes"},
    platform="linux/amd64",
)


def make_disk(path: Path, blocks: int = 3072) -> Path:
    """A real ext4 disk of ``blocks`` 4 KiB blocks (12 MiB) holding random and text files."""
    tree = path.parent / f"{path.name}.tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "random.bin").write_bytes(os.urandom(3 * MiB + 12345))
    (tree / "etc" / "numbers").write_text("\n".join(str(i) for i in range(60000)))
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": "1", "LC_ALL": "C"}
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-b", "4096",
         "-d", str(tree), str(path), str(blocks)],
        check=True, env=env, capture_output=True,
    )  # fmt: skip
    shutil.rmtree(tree)
    return path


def subject_for(name: str | None = None) -> Descriptor:
    """A platform manifest's descriptor (the manifest need not exist: subjects may dangle)."""
    seed = name or secrets.token_hex(8)
    return Descriptor(OCI_MANIFEST, Digest.of(seed.encode()), 1000 + len(seed))


def recipe_for(subject: Descriptor, **changes: Any) -> Recipe:
    recipe = Recipe(
        source=subject.digest,
        format=DiskFormat.EXT4,
        builder="hypeman-images 0.1.0",
        e2fsprogs="1.47.2",
        one_pass=True,
        free_space=16 * MiB,
    )
    return replace(recipe, **changes)


def cache_repo(host: str, hint: str) -> Reference:
    """A fresh repository on the test registry for one test."""
    safe = "".join(c if c.isalnum() else "-" for c in hint.lower()).strip("-")[:40]
    return Reference(host, f"cache/{safe}-{secrets.token_hex(4)}")


@dataclass(frozen=True)
class Forged:
    """What :func:`forge` pushed."""

    digest: Digest
    manifest: bytes
    config: DiskConfig


def chunks_of(data: bytes, chunk_size: int = CHUNK) -> list[bytes]:
    return [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]


def forge(
    client: RegistryClient,
    repo: Reference,
    subject: Descriptor,
    config: DiskConfig,
    blobs: Sequence[bytes],
    sizes: Sequence[int],
    *,
    tag: str | None = None,
    fields: Mapping[str, Any] | None = None,
) -> Forged:
    """Push chunk ``blobs`` (declared ``sizes``), ``config`` and a manifest with ``fields`` over."""
    chunks = []
    offset = 0
    for blob, size in zip(blobs, sizes, strict=True):
        digest = Digest.of(blob)
        push_blob(client, repo, digest, blob)
        chunks.append(Chunk(offset, size, Descriptor(CHUNK_TYPE, digest, len(blob))))
        offset += size
    config_data = config.to_bytes()
    push_blob(client, repo, Digest.of(config_data), config_data)
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {
            "mediaType": CONFIG_TYPE,
            "digest": str(Digest.of(config_data)),
            "size": len(config_data),
        },
        "layers": [chunk.to_json() for chunk in chunks],
        "subject": {
            "mediaType": subject.media_type,
            "digest": str(subject.digest),
            "size": subject.size,
        },
        "annotations": annotations_for(config),
    }
    doc.update(fields or {})
    data = canonical_json(doc)
    pushed = put_manifest(client, repo, tag or str(Digest.of(data)), data, OCI_MANIFEST)
    return Forged(pushed.digest, data, config)


def honest(
    disk: bytes, subject: Descriptor, recipe: Recipe, chunk_size: int = CHUNK
) -> tuple[DiskConfig, list[bytes], list[int]]:
    """A truthful config, compressed chunks and their sizes for ``disk``: forge's raw material."""
    pieces = chunks_of(disk, chunk_size)
    config = DiskConfig(recipe, RUNTIME, len(disk), Digest.of(disk), chunk_size)
    return config, [compress_chunk(p) for p in pieces], [len(p) for p in pieces]


def artifact_of(disk: bytes, subject: Descriptor, recipe: Recipe) -> DiskArtifact:
    """The artifact :func:`forge` would push for ``disk``, built the library's way."""
    config, blobs, sizes = honest(disk, subject, recipe)
    chunks, offset = [], 0
    for blob, size in zip(blobs, sizes, strict=True):
        chunks.append(Chunk(offset, size, Descriptor(CHUNK_TYPE, Digest.of(blob), len(blob))))
        offset += size
    return build_artifact(subject, config, chunks)


def index_of(registry_url: str, repo: Reference, subject: Digest) -> dict[str, Any] | None:
    """The fallback referrers index as the registry holds it (None: no such tag)."""
    url = f"{registry_url}/v2/{repo.repository}/manifests/{fallback_tag(subject)}"
    response = httpx.get(url, headers={"Accept": OCI_INDEX})
    if response.status_code == 404:
        return None
    assert response.status_code == 200, response.text
    doc: dict[str, Any] = response.json()
    return doc


def referrer_in(registry_url: str, repo: Reference, name: str) -> Referrer:
    """A small manifest pushed to ``repo`` (by the independent pusher), as a referrer entry.

    distribution 2.8 refuses an index naming a manifest it does not hold, so
    every entry a test writes must exist.
    """
    config = json.dumps({"name": name}).encode()
    independent.push_blob(registry_url, repo.repository, config)
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.test",
        "config": {"mediaType": "application/vnd.example.test.config+json",
                   "digest": str(Digest.of(config)), "size": len(config)},
        "layers": [],
        "annotations": {"org.example.name": name},
    }  # fmt: skip
    data = canonical_json(doc)
    url = f"{registry_url}/v2/{repo.repository}/manifests/{Digest.of(data)}"
    response = httpx.put(url, content=data, headers={"Content-Type": OCI_MANIFEST})
    assert response.status_code == 201, response.text
    return Referrer(
        OCI_MANIFEST, Digest.of(data), len(data), "application/vnd.example.test",
        {"org.example.name": name},
    )  # fmt: skip


def add_in_process(host: str, repository: str, subject: str, raw: dict[str, Any]) -> bool:
    """:func:`add_referrer` from another process (a ``multiprocessing`` target)."""
    entry = Referrer(
        raw["mediaType"], Digest.parse(raw["digest"]), raw["size"],
        raw.get("artifactType", ""), raw.get("annotations", {}),
    )  # fmt: skip
    with RegistryClient(config=FAST) as client:
        return add_referrer(
            client, Reference(host, repository), Digest.parse(subject), entry,
            settle=1.0, attempts=20,
        )  # fmt: skip
