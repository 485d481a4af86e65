"""Digests parse strictly and the verifying stream catches every mismatch."""

from __future__ import annotations

import hashlib

import pytest

from hypeman_images.errors import DigestMismatch, InvalidArgument
from hypeman_images.oci.digest import Digest, VerifyingStream


def test_round_trip() -> None:
    digest = Digest.of(b"hello")
    assert str(digest) == "sha256:" + hashlib.sha256(b"hello").hexdigest()
    assert Digest.parse(str(digest)) == digest
    assert digest.short == digest.encoded[:12]


@pytest.mark.parametrize(
    "text", ["sha256", "sha256:", "sha256:xyz", "SHA256:" + "a" * 64, "sha256:" + "a" * 63]
)
def test_rejects_malformed(text: str) -> None:
    with pytest.raises(InvalidArgument):
        Digest.parse(text)


def test_stream_passes_good_bytes() -> None:
    data = [b"a" * 10, b"b" * 5]
    stream = VerifyingStream(data, Digest.of(b"".join(data)), 15)
    assert b"".join(stream) == b"".join(data)
    stream.verify()


def test_stream_rejects_wrong_bytes() -> None:
    stream = VerifyingStream([b"evil"], Digest.of(b"good"), 4)
    list(stream)
    with pytest.raises(DigestMismatch, match="hashes to"):
        stream.verify()


def test_stream_rejects_extra_bytes_early() -> None:
    stream = VerifyingStream([b"aaaa", b"bbbb"], Digest.of(b"aaaa"), 4)
    with pytest.raises(DigestMismatch, match="more than"):
        list(stream)


def test_short_stream() -> None:
    stream = VerifyingStream([b"ab"], Digest.of(b"abc"), 3)
    list(stream)
    with pytest.raises(DigestMismatch, match="received 2 bytes"):
        stream.verify()
