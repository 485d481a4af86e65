"""What the session fixtures yield: an image pushed to the test registry."""

from __future__ import annotations

from dataclasses import dataclass, field

from .images import Image, Index
from .oracle import Node
from .registry import RegistryServer


@dataclass(frozen=True)
class PushedImage:
    """An image (or index) in the test registry and the tree it must flatten to.

    ``manifest_digest`` is the digest the tag resolves to (an index digest
    for multi-platform images, whose ``image`` is then the linux/amd64 one).
    """

    registry: RegistryServer
    repository: str
    tag: str
    manifest_digest: str
    image: Image
    expected_tree: dict[str, Node] = field(hash=False)
    index: Index | None = None

    @property
    def ref(self) -> str:
        """``127.0.0.1:PORT/<repository>:<tag>``."""
        return f"{self.registry.host}/{self.repository}:{self.tag}"

    @property
    def digest_ref(self) -> str:
        """``127.0.0.1:PORT/<repository>@<manifest_digest>``."""
        return f"{self.registry.host}/{self.repository}@{self.manifest_digest}"
