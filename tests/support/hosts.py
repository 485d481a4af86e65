"""Hosts of a fleet for the disk-cache tests: one data dir each, one registry between them.

A host is an :class:`ImageManager` on its own data dir whose options name the
disk cache. Its registry client may send a registry's requests through a
:class:`FaultProxy` as that registry's mirror (every request then goes through
the proxy, which counts them, and names stay those of the real registry), or
use the proxy's own address for the cache repository (so the proxy's faults
reach the cache and nothing else).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from hypeman_images.build.manager import ImageManager
from hypeman_images.build.options import BuildOptions
from hypeman_images.fleet.cache import CacheMode, DiskCache
from hypeman_images.fsutil import TEMP_PREFIX
from hypeman_images.oci.reference import Reference
from hypeman_images.registry.client import RegistryClient
from hypeman_images.registry.config import Mirror, RegistryConfig, RegistrySettings

from .fleet import FAST

# What two hosts' records of one disk may differ in: when, who, and where the disk came from.
LOCAL_FIELDS = {
    "created_at",
    "updated_at",
    "writer",
    "source",
    "source_artifact",
    "source_repository",
}


def through(proxy_host: str, registry_host: str) -> RegistryConfig:
    """A client config that asks ``registry_host`` through ``proxy_host``, as its mirror."""
    settings = RegistrySettings(registry_host, None, (Mirror(proxy_host, insecure=True),))
    return replace(FAST, registries={registry_host: settings})


@contextmanager
def host(
    data_dir: Path,
    cache: Reference | None,
    *,
    mode: CacheMode = CacheMode.BOTH,
    config: RegistryConfig = FAST,
    **options: Any,
) -> Iterator[ImageManager]:
    """A host: a manager on ``data_dir`` using the disk cache ``cache``, closed (and its
    pushes drained) on leaving."""
    disk_cache = DiskCache(cache, mode) if cache is not None else None
    factory: Callable[[], RegistryClient] = lambda: RegistryClient(config=config)  # noqa: E731
    build = BuildOptions(disk_cache=disk_cache, **options)
    with ImageManager(data_dir, options=build, client_factory=factory) as manager:
        yield manager


def record_of(disk: Path) -> dict[str, Any]:
    """The metadata.json beside ``disk``."""
    doc: dict[str, Any] = json.loads((disk.parent / "metadata.json").read_text())
    return doc


def shared_part(record: dict[str, Any]) -> dict[str, Any]:
    """A record without what differs between two hosts holding the same disk."""
    return {k: v for k, v in record.items() if k not in LOCAL_FIELDS}


def temp_files(data_dir: Path) -> list[Path]:
    """Temp files left anywhere in the image store."""
    return sorted(p for p in (data_dir / "images").rglob(f"{TEMP_PREFIX}*"))
