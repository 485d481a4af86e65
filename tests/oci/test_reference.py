"""Reference parsing follows Docker's grammar and normalisation."""

from __future__ import annotations

import pytest

from hypeman_images.errors import InvalidReference
from hypeman_images.oci.digest import Digest
from hypeman_images.oci.reference import parse_reference

HEX = "a" * 64


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("alpine", "docker.io/library/alpine:latest"),
        ("alpine:3.20", "docker.io/library/alpine:3.20"),
        ("library/alpine", "docker.io/library/alpine:latest"),
        ("docker.io/alpine", "docker.io/library/alpine:latest"),
        ("index.docker.io/foo/bar", "docker.io/foo/bar:latest"),
        ("myorg/app:v1", "docker.io/myorg/app:v1"),
        ("localhost/app", "localhost/app:latest"),
        ("localhost:5000/x:y", "localhost:5000/x:y"),
        ("127.0.0.1:5000/a/b/c:1.0", "127.0.0.1:5000/a/b/c:1.0"),
        ("[::1]:5000/x", "[::1]:5000/x:latest"),
        ("ghcr.io/org/app@sha256:" + HEX, "ghcr.io/org/app@sha256:" + HEX),
        ("host.io/repo:tag@sha256:" + HEX, "host.io/repo:tag@sha256:" + HEX),
        ("quay.io/a_b/c__d/e-f--g.h:T_1.x-y", "quay.io/a_b/c__d/e-f--g.h:T_1.x-y"),
    ],
    ids=lambda value: value[:40],
)
def test_normalises_like_docker(text: str, canonical: str) -> None:
    assert str(parse_reference(text)) == canonical


def test_parts_and_familiar_form() -> None:
    ref = parse_reference("alpine@sha256:" + HEX)
    assert ref.registry == "docker.io"
    assert ref.repository == "library/alpine"
    assert ref.tag is None
    assert ref.digest == Digest("sha256", HEX)
    assert ref.familiar() == "alpine@sha256:" + HEX
    assert ref.api_host == "registry-1.docker.io"


@pytest.mark.parametrize(
    "text",
    ["127.0.0.1:5000/x", "localhost:1/x", "[::1]:5000/x", "127.1.2.3/x"],
)
def test_loopback_registries(text: str) -> None:
    assert parse_reference(text).is_loopback


def test_remote_registry_is_not_loopback() -> None:
    assert not parse_reference("ghcr.io/x").is_loopback


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("Alpine", "lower-case"),
        ("docker.io/Library/alpine", "lower-case"),
        ("alpine@sha256:abc", "sha256"),
        ("alpine@md5:" + HEX, "unsupported algorithm"),
        ("alpine@sha256:" + "A" * 64, "lower-case hex"),
        ("alpine:.bad", "tag"),
        ("alpine:" + "t" * 129, "tag"),
        ("host:5000/", "empty"),
        ("foo//bar", "repository"),
        ("-x", "repository"),
        ("a b", "white space"),
        (HEX, "ambiguous"),
        ("ex ample.com/x", "white space"),
        ("a" * 300, "255"),
    ],
    ids=repr,
)
def test_rejects_invalid_names(text: str, says: str) -> None:
    with pytest.raises(InvalidReference, match=says):
        parse_reference(text)
