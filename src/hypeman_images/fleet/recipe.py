"""The build recipe: what a disk was made from and every choice that decides its bytes.

Same source digest and same recipe give the same disk, byte for byte (the
reproducibility contract, docs/design.md). Two recipes *match* when a disk of
one is a valid disk for the other: same source, format, builder and
byte-changing options; only the e2fsprogs release may differ, since it
changes how mke2fs lays the tree out, never which tree (docs/disk-artifacts.md,
"Recipes"). An *exact* match (the same release too) is preferred: its disk
is the very one a local build would make.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hypeman_images.errors import DiskArtifactInvalid, HypemanError
from hypeman_images.oci.digest import Digest
from hypeman_images.store.formats import DiskFormat as DiskFormat  # the store's, re-exported


def canonical_json(doc: Any) -> bytes:
    """The one byte form of a document of the artifact: sorted keys, no white space, ASCII.

    Every document hashed or pushed is written this way, so that equal
    contents give equal digests.
    """
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True)
class Recipe:
    """How a disk was built from ``source``, the platform manifest it came from.

    ``builder`` names the code that flattened the layers (the hypeman-images
    release, or any string the builder changes whenever the tree it makes
    could change); ``e2fsprogs`` is mke2fs's release (``1.47.2``);
    ``one_pass`` the build path taken (the two paths make different
    filesystem features); ``free_space`` the bytes left free; ``options``
    every further option that changes the bytes (``{"fallback": "staged"}``).
    """

    source: Digest
    format: DiskFormat
    builder: str
    e2fsprogs: str
    one_pass: bool
    free_space: int
    options: Mapping[str, str] = field(default_factory=dict, hash=False)

    def settings(self) -> dict[str, Any]:
        """The recipe as the config's ``recipe`` object (source and format stand beside it)."""
        return {
            "builder": self.builder,
            "e2fsprogs": self.e2fsprogs,
            "free_space": self.free_space,
            "one_pass": self.one_pass,
            "options": dict(self.options),
        }

    @classmethod
    def from_settings(cls, source: Digest, format: DiskFormat, doc: Any) -> Recipe:
        """Parse a config's ``recipe`` object; :class:`DiskArtifactInvalid` if malformed."""
        if not isinstance(doc, dict):
            raise DiskArtifactInvalid("the disk config's recipe is not an object")
        want = {"builder": str, "e2fsprogs": str, "free_space": int, "one_pass": bool}
        for key, kind in want.items():
            value = doc.get(key)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise DiskArtifactInvalid(
                    f"the disk config's recipe.{key} is not a {kind.__name__}"
                )
        options = doc.get("options", {})
        if not isinstance(options, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in options.items()
        ):
            raise DiskArtifactInvalid("the disk config's recipe.options is not a string map")
        if doc["free_space"] < 0:
            raise DiskArtifactInvalid("the disk config's recipe.free_space is negative")
        return cls(
            source, format, doc["builder"], doc["e2fsprogs"], doc["one_pass"],
            doc["free_space"], dict(options),
        )  # fmt: skip

    def _hash(self, *, tools: bool) -> str:
        doc = {"source": str(self.source), "format": str(self.format), **self.settings()}
        if not tools:
            del doc["e2fsprogs"]
        return hashlib.sha256(canonical_json(doc)).hexdigest()

    @property
    def key(self) -> str:
        """sha256 (hex) of the whole recipe: equal keys, byte-identical disks."""
        return self._hash(tools=True)

    @property
    def match_key(self) -> str:
        """sha256 (hex) of what :meth:`matches` compares: equal keys, interchangeable disks."""
        return self._hash(tools=False)

    def matches(self, other: Recipe) -> bool:
        """True if a disk of ``other`` will do for this recipe (the e2fsprogs release aside)."""
        return self.match_key == other.match_key

    def exact(self, other: Recipe) -> bool:
        """True if a disk of ``other`` is byte for byte the disk of this recipe."""
        return self.key == other.key

    @property
    def tag(self) -> str:
        """The artifact's own tag: ``<alg>-<source hex>.<format>.<16 hex of key>``.

        A tag per recipe, next to the referrers tag ``<alg>-<hex>`` of the
        same subject, so that a lost update of that shared index never loses
        this artifact (docs/disk-artifacts.md, "Finding"). At most 94
        characters, within the 128 a tag may have.
        """
        return f"{self.source.algorithm}-{self.source.encoded[:64]}.{self.format}.{self.key[:16]}"


def parse_format(value: Any) -> DiskFormat:
    """A config's ``format``; :class:`DiskArtifactInvalid` for one this version does not know."""
    try:
        return DiskFormat(value)
    except ValueError:
        raise DiskArtifactInvalid(
            f"the disk artifact is of format {value!r}, which this version does not know "
            f"(known: {', '.join(DiskFormat)})"
        ) from None


def parse_digest(value: Any, what: str) -> Digest:
    """A digest field of the config; :class:`DiskArtifactInvalid` if malformed."""
    try:
        return Digest.parse(str(value))
    except HypemanError as exc:
        raise DiskArtifactInvalid(f"the disk config's {what} is malformed: {exc.message}") from exc
