"""Session fixtures: one real registry on 127.0.0.1 with the standard test images.

Images are pushed once per session with the independent pusher in
``support.push``; each fixture yields a ``PushedImage`` carrying the expected
flattened tree (from the oracle, or hand-written for the multilayer image).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.images import (
    BUSYBOX_GLIBC_DIGEST,
    BUSYBOX_GLIBC_LAYOUT,
    alpine_3_20_3,
    alpine_multiplatform,
    image_from_oci_layout,
    push_image,
    push_index,
    push_oci_layout,
)
from support.multilayer import multilayer_image
from support.oracle import apply_layers
from support.pushed import PushedImage
from support.registry import RegistryServer, start_registry
from support.users import UnprivilegedUser


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """A docker-registry 2.8 on 127.0.0.1 (no auth, delete enabled) for the session."""
    with start_registry(tmp_path_factory.mktemp("registry")) as server:
        yield server


@pytest.fixture(scope="session")
def alpine_ref(registry: RegistryServer) -> PushedImage:
    """``library/alpine:3.20.3`` (linux/amd64, one gzip layer, OCI media types)."""
    image = alpine_3_20_3()
    digest = push_image(registry.url, "library/alpine", "3.20.3", image)
    tree = apply_layers(layer.tar for layer in image.layers)
    return PushedImage(registry, "library/alpine", "3.20.3", digest, image, tree)


@pytest.fixture(scope="session")
def busybox_ref(registry: RegistryServer) -> PushedImage:
    """``library/busybox:1.38.0-glibc`` pushed byte for byte from its OCI layout."""
    digest = push_oci_layout(registry.url, "library/busybox", "1.38.0-glibc", BUSYBOX_GLIBC_LAYOUT)
    assert digest == BUSYBOX_GLIBC_DIGEST
    image = image_from_oci_layout(BUSYBOX_GLIBC_LAYOUT)
    tree = apply_layers(layer.tar for layer in image.layers)
    return PushedImage(registry, "library/busybox", "1.38.0-glibc", digest, image, tree)


@pytest.fixture(scope="session")
def multilayer_ref(registry: RegistryServer) -> PushedImage:
    """``test/multilayer:v1``: whiteouts, opaque dir, hard links, xattrs; hand-written tree."""
    image, tree = multilayer_image()
    digest = push_image(registry.url, "test/multilayer", "v1", image)
    return PushedImage(registry, "test/multilayer", "v1", digest, image, tree)


@pytest.fixture(scope="session")
def multiplatform_ref(registry: RegistryServer) -> PushedImage:
    """``library/alpine:3.20.3-multi``: an OCI index of linux/amd64 and linux/arm64/v8.

    ``manifest_digest`` is the index's; ``image``/``expected_tree`` are amd64's.
    """
    index = alpine_multiplatform()
    digest = push_index(registry.url, "library/alpine", "3.20.3-multi", index)
    amd64 = index.images[0]
    tree = apply_layers(layer.tar for layer in amd64.layers)
    return PushedImage(registry, "library/alpine", "3.20.3-multi", digest, amd64, tree, index)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A fresh, empty data directory for the project's store."""
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def unprivileged_user() -> UnprivilegedUser:
    """Runs commands (``.run``/``.wrap``) or callables (``.call``) as nobody."""
    return UnprivilegedUser()
