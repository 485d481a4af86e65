"""The one seam the CLI and the API use: create, list, get, delete, gc.

:class:`ImageManager` owns the data dir (image store + blob cache) and the
registry client, and runs :func:`pipeline.build` for each image.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .blobs import BlobStore
from .config import BuildOptions, DataDir
from .digest import Digest
from .pipeline import BuildStats, build
from .progress import Reporter
from .reference import Reference, parse_reference
from .registry import RegistryClient
from .store import ImageStatus, ImageStore, StoredImage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GcReport:
    """What ``gc`` removed."""

    blobs_removed: int
    bytes_freed: int


class ImageManager:
    """Images in one data dir.

    ``client_factory`` makes the registry client (tests pass one with their own
    transport or configuration); it is called once and the client is reused.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        options: BuildOptions | None = None,
        client_factory: Callable[[], RegistryClient] = RegistryClient,
    ) -> None:
        self.data = DataDir(data_dir)
        self.options = options or BuildOptions()
        self.store = ImageStore(self.data.images)
        self.blobs = BlobStore(self.data.cache)
        self._client_factory = client_factory
        self._client: RegistryClient | None = None

    @property
    def client(self) -> RegistryClient:
        """The registry client, made on first use."""
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    def close(self) -> None:
        """Release the registry client's connections."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> ImageManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pull(
        self,
        name: str | Reference,
        *,
        options: BuildOptions | None = None,
        reporter: Reporter | None = None,
        stats: BuildStats | None = None,
    ) -> StoredImage:
        """Resolve, pull and convert ``name`` now; return the ready image."""
        ref = parse_reference(name) if isinstance(name, str) else name
        return build(
            ref,
            client=self.client,
            blobs=self.blobs,
            store=self.store,
            options=options or self.options,
            reporter=reporter,
            stats=stats,
        )

    def get(self, name: str | Reference) -> StoredImage:
        """The local image ``name`` names (tag or digest); NotFound otherwise."""
        ref = parse_reference(name) if isinstance(name, str) else name
        return self.store.find(ref)

    def list(self) -> list[StoredImage]:
        """Every image in the store, by name."""
        return sorted(self.store.scan(), key=lambda s: (s.repository, s.record.created_at))

    def delete(self, name: str | Reference) -> list[str]:
        """Delete by tag (the disk goes with its last tag) or by digest (with all its tags)."""
        ref = parse_reference(name) if isinstance(name, str) else name
        return self.store.remove(ref)

    def gc(self) -> GcReport:
        """Remove blobs no ready or active image needs, and leftovers of interrupted work."""
        keep: set[Digest] = set()
        for image in self.store.scan():
            record = image.record
            if record.status is ImageStatus.FAILED:
                continue
            keep.add(Digest.parse(record.digest))
            if record.config_digest:
                keep.add(Digest.parse(record.config_digest))
            keep.update(Digest.parse(layer) for layer in record.layers)
        freed = self.store.sweep()
        result = self.blobs.gc(keep)
        return GcReport(result.blobs_removed, result.bytes_freed + freed)
