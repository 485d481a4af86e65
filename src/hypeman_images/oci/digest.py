"""Content digests (OCI image-spec ``descriptor.md#digests``) and a verifying reader."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from hypeman_images.errors import DigestMismatch, InvalidArgument

# The algorithms the spec registers, with the exact encoded form each requires.
_ENCODED = {
    "sha256": re.compile(r"[a-f0-9]{64}"),
    "sha512": re.compile(r"[a-f0-9]{128}"),
}
_ALGORITHM = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*")
# A sha256 in hex: how digest directories and tag-link targets are named on disk.
SHA256_HEX = _ENCODED["sha256"]


@dataclass(frozen=True, order=True)
class Digest:
    """A parsed ``algorithm:encoded`` digest; ``str()`` gives the canonical form."""

    algorithm: str
    encoded: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse ``sha256:<64 hex>``; raise :class:`InvalidArgument` on anything else."""
        algorithm, sep, encoded = text.partition(":")
        if not sep or not _ALGORITHM.fullmatch(algorithm):
            raise InvalidArgument(f"invalid digest {text!r}: expected algorithm:hex")
        pattern = _ENCODED.get(algorithm)
        if pattern is None:
            raise InvalidArgument(f"invalid digest {text!r}: unsupported algorithm {algorithm}")
        if not pattern.fullmatch(encoded):
            raise InvalidArgument(
                f"invalid digest {text!r}: {algorithm} needs {pattern.pattern} lower-case hex"
            )
        return cls(algorithm, encoded)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        """The digest of ``data``."""
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> hashlib._Hash:
        """A fresh hash object of this digest's algorithm."""
        return hashlib.new(self.algorithm)

    @property
    def short(self) -> str:
        """Twelve characters, as registries and docker show them."""
        return self.encoded[:12]

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.encoded}"


class VerifyingStream:
    """Pass chunks through while hashing them; :meth:`verify` checks the total.

    Every byte from the network goes through one of these before anyone can see
    it as the content a digest names.
    """

    def __init__(self, chunks: Iterable[bytes], expected: Digest, size: int | None = None) -> None:
        self._chunks = chunks
        self.expected = expected
        self.size = size
        self._hash = expected.hasher()
        self.count = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            self.count += len(chunk)
            if self.size is not None and self.count > self.size:
                raise DigestMismatch(
                    f"{self.expected}: received more than the {self.size} bytes its descriptor says"
                )
            self._hash.update(chunk)
            yield chunk

    def verify(self) -> None:
        """Raise :class:`DigestMismatch` unless everything seen hashes to the digest."""
        if self.size is not None and self.count != self.size:
            raise DigestMismatch(
                f"{self.expected}: received {self.count} bytes, its descriptor says {self.size}"
            )
        actual = Digest(self.expected.algorithm, self._hash.hexdigest())
        if actual != self.expected:
            raise DigestMismatch(f"content of {self.expected} hashes to {actual}")
