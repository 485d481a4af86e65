"""The disk cache a host uses: one repository, and which way disks go through it.

A fleet shares built disks through one repository of an OCI registry
(docs/disk-artifacts.md): a host *looks* there before it builds and *pushes*
what it built. ``--disk-cache REGISTRY/REPOSITORY`` (or ``HYPEMAN_DISK_CACHE``,
or ``disk-cache`` in registries.conf) names it; ``--disk-cache-mode`` says
which way (docs/configuration.md, "The disk cache"). The repository is reached
exactly as images are: the same client, credentials, TLS rules and mirrors.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from hypeman_images.errors import HypemanError, InvalidArgument
from hypeman_images.oci.reference import DOCKER_HUB, Reference, parse_reference


class CacheMode(enum.StrEnum):
    """Which way disks go: looked up before a build, pushed after one, or both."""

    PULL = "pull"
    PUSH = "push"
    BOTH = "both"


@dataclass(frozen=True)
class DiskCache:
    """Where built disks are shared, and how this host uses it.

    ``repository`` names a registry and a repository (never a tag or a
    digest: an artifact's names are its own). ``required`` is for ``disk
    pull``: a disk from the cache or an error, never a local build.
    """

    repository: Reference
    mode: CacheMode = CacheMode.BOTH
    required: bool = False

    @property
    def looks(self) -> bool:
        """Does a build look in the cache before it pulls layers?"""
        return self.mode in (CacheMode.PULL, CacheMode.BOTH) or self.required

    @property
    def pushes(self) -> bool:
        """Is a disk built here pushed to the cache?"""
        return self.mode in (CacheMode.PUSH, CacheMode.BOTH)

    def __str__(self) -> str:
        return self.repository.name

    @classmethod
    def parse(cls, text: str, mode: str = CacheMode.BOTH) -> DiskCache:
        """``REGISTRY/REPOSITORY`` and a mode; :class:`InvalidArgument` says what is wrong."""
        return cls(parse_repository(text), parse_mode(mode))


def parse_mode(text: str) -> CacheMode:
    """``pull``, ``push`` or ``both``."""
    try:
        return CacheMode(text)
    except ValueError:
        raise InvalidArgument(
            f"invalid disk cache mode {text!r}: expected {', '.join(CacheMode)}"
        ) from None


def parse_repository(text: str) -> Reference:
    """A cache repository, ``REGISTRY/REPOSITORY``: the registry named, no tag, no digest.

    The registry must be written out: a bare ``disks`` would otherwise mean
    ``docker.io/library/disks``, and a host would push its disks to Docker Hub.
    """
    what = f"invalid disk cache {text!r}"
    if "/" not in text:
        raise InvalidArgument(f"{what}: expected REGISTRY/REPOSITORY, e.g. registry.lan:5000/disks")
    if "@" in text or ":" in text.rpartition("/")[2]:
        raise InvalidArgument(f"{what}: name a repository, without a tag or a digest")
    try:
        ref = parse_reference(text)
    except HypemanError as exc:
        raise InvalidArgument(f"{what}: {exc.message}") from exc
    if ref.registry == DOCKER_HUB and not text.startswith(("docker.io/", "index.docker.io/")):
        raise InvalidArgument(f"{what}: expected REGISTRY/REPOSITORY, e.g. registry.lan:5000/disks")
    return Reference(ref.registry, ref.repository)


__all__ = ["CacheMode", "DiskCache", "parse_mode", "parse_repository"]
