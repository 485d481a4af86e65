"""Fixtures of the fleet tests: a small real ext4 disk, e2fsprogs, a client, a fresh cache repo."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.fleet import FAST, cache_repo, make_disk
from support.registry import RegistryServer

from hypeman_images.disk.e2fsprogs import E2fsprogs, find_e2fsprogs
from hypeman_images.oci.reference import Reference
from hypeman_images.registry.client import RegistryClient


@pytest.fixture(scope="session")
def tools() -> E2fsprogs:
    return find_e2fsprogs()


@pytest.fixture(scope="session")
def ext4_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12 MiB ext4 disk made by mke2fs (read it, never change it: copy first)."""
    return make_disk(tmp_path_factory.mktemp("disk") / "rootfs.ext4")


@pytest.fixture
def client() -> Iterator[RegistryClient]:
    with RegistryClient(config=FAST) as c:
        yield c


@pytest.fixture
def repo(registry: RegistryServer, request: pytest.FixtureRequest) -> Reference:
    """A repository of its own on the session's registry."""
    return cache_repo(registry.host, request.node.name)


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    """Where a fetched disk goes; its directory holds nothing else."""
    out = tmp_path / "store"
    out.mkdir()
    return out / "rootfs.ext4"
