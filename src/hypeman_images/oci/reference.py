"""Image references: parse and normalise names the way Docker does.

The grammar is distribution's ``reference`` package::

    reference      := name [ ":" tag ] [ "@" digest ]
    name           := [domain "/"] remote-name
    domain         := host [":" port]
    remote-name    := path-component ["/" path-component]*
    path-component := [a-z0-9]+ (separator [a-z0-9]+)*
    separator      := [_.] | "__" | "-"+
    tag            := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}

Normalisation follows ``ParseNormalizedNamed``: a first component is a
registry host only if it contains ``.`` or ``:`` or is ``localhost``;
otherwise the name lives on Docker Hub (``docker.io``), where one-component
names gain ``library/``. A name with neither tag nor digest gets ``latest``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace

from hypeman_images.errors import InvalidArgument, InvalidReference
from hypeman_images.oci.digest import SHA256_HEX, Digest

DOCKER_HUB = "docker.io"
# Docker Hub's API does not live at its name; every client maps it.
DOCKER_HUB_API = "registry-1.docker.io"
DEFAULT_TAG = "latest"
MAX_NAME_LENGTH = 255

_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[_.]|__|-+)[a-z0-9]+)*"
_REMOTE_NAME = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?"
)
_TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)


@dataclass(frozen=True)
class Reference:
    """A normalised image reference: always a registry, a repository, and a tag or digest.

    ``str()`` gives the canonical, fully qualified form
    (``docker.io/library/alpine:latest``); :meth:`familiar` the short one users type.
    """

    registry: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @property
    def name(self) -> str:
        """``registry/repository`` with neither tag nor digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def api_host(self) -> str:
        """The host that serves the Distribution API for this registry."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def is_loopback(self) -> bool:
        """True for registries on 127.0.0.0/8, ::1 or localhost (plain HTTP allowed)."""
        host = (
            self.registry.rsplit(":", 1)[0]
            if not self.registry.startswith("[")
            else (self.registry[1:].split("]", 1)[0])
        )
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def with_digest(self, digest: Digest) -> Reference:
        """The same reference, resolved: the tag kept for display, the digest added."""
        return replace(self, digest=digest)

    def with_tag(self, tag: str | None) -> Reference:
        """The same repository with another tag (and no digest)."""
        return replace(self, tag=tag, digest=None)

    def pinned(self) -> str:
        """``name:tag`` when there is a tag, else ``name@digest``: how a build is named.

        A resolved reference carries both; the tag is what the user asked for.
        """
        return f"{self.name}:{self.tag}" if self.tag else f"{self.name}@{self.digest}"

    def familiar(self) -> str:
        """The short form Docker prints: ``alpine:3.20`` rather than the full name."""
        name = self.name
        if self.registry == DOCKER_HUB:
            name = self.repository.removeprefix("library/")
        return name + self._suffix()

    def _suffix(self) -> str:
        out = f":{self.tag}" if self.tag else ""
        return out + (f"@{self.digest}" if self.digest else "")

    def __str__(self) -> str:
        return self.name + self._suffix()


def parse_reference(text: str) -> Reference:
    """Parse and normalise a user's image name.

    Raises :class:`InvalidReference` with a message that says what is wrong,
    before anything touches the network.
    """
    if not text or not text.strip():
        raise InvalidReference("invalid image name: it is empty")
    if text != text.strip() or any(c.isspace() for c in text):
        raise InvalidReference(f"invalid image name {text!r}: it contains white space")
    if SHA256_HEX.fullmatch(text):
        raise InvalidReference(
            f"invalid image name {text!r}: a bare 64-character hex string is ambiguous; "
            "write it as REPOSITORY@sha256:HEX"
        )

    rest, at, digest_text = text.partition("@")
    digest = None
    if at:
        try:
            digest = Digest.parse(digest_text)
        except InvalidArgument as exc:
            raise InvalidReference(f"invalid image name {text!r}: {exc.message}") from exc

    tag = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise InvalidReference(
                f"invalid image name {text!r}: tag {tag!r} must be 1-128 characters of "
                "letters, digits, '_', '.' and '-', not starting with '.' or '-'"
            )

    registry, repository = _split_registry(rest, text)
    if not repository:
        raise InvalidReference(f"invalid image name {text!r}: the repository is empty")
    if repository.lower() != repository and _REMOTE_NAME.fullmatch(repository.lower()):
        raise InvalidReference(f"invalid image name {text!r}: repository names must be lower-case")
    if not _REMOTE_NAME.fullmatch(repository):
        raise InvalidReference(
            f"invalid image name {text!r}: repository {repository!r} must be lower-case "
            "letters and digits separated by '/', '.', '_', '__' or '-'"
        )
    if len(f"{registry}/{repository}") > MAX_NAME_LENGTH:
        raise InvalidReference(f"invalid image name {text!r}: longer than 255 characters")

    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry, repository, tag, digest)


def _split_registry(name: str, text: str) -> tuple[str, str]:
    first, slash, remainder = name.partition("/")
    is_host = slash and (
        "." in first or ":" in first or first == "localhost" or first.lower() != first
    )
    if not is_host:
        repository = name if "/" in name else f"library/{name}"
        return DOCKER_HUB, repository
    if not _HOST.fullmatch(first):
        raise InvalidReference(
            f"invalid image name {text!r}: {first!r} is not a valid registry host"
        )
    if first == "index.docker.io":
        first = DOCKER_HUB
    if first == DOCKER_HUB and "/" not in remainder:
        remainder = f"library/{remainder}"
    return first, remainder
