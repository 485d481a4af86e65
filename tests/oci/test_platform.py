"""``Platform.parse``: the forms ``docker --platform`` accepts, normalised as containerd does."""

from __future__ import annotations

import pytest

from hypeman_images.errors import InvalidArgument, InvalidPlatform
from hypeman_images.oci.spec import Platform


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("linux/amd64", "linux/amd64", id="os-arch"),
        pytest.param("linux/arm64/v8", "linux/arm64", id="arm64-default-variant-dropped"),
        pytest.param("linux/arm64/8", "linux/arm64", id="arm64-bare-default-variant"),
        pytest.param("linux/arm64/v9", "linux/arm64/v9", id="arm64-other-variant-kept"),
        pytest.param("linux/arm/7", "linux/arm/v7", id="arm-variant-spelled-v"),
        pytest.param("linux/arm/v6", "linux/arm/v6", id="arm-v6"),
        pytest.param("arm64", "linux/arm64", id="arch-alone-means-linux"),
        pytest.param("amd64", "linux/amd64", id="amd64-alone"),
        pytest.param("x86_64", "linux/amd64", id="alias-x86_64"),
        pytest.param("linux/aarch64", "linux/arm64", id="alias-aarch64"),
        pytest.param("linux/amd64/v1", "linux/amd64", id="amd64-default-variant-dropped"),
        pytest.param("armhf", "linux/arm/v7", id="alias-armhf-implies-v7"),
        pytest.param("LINUX/AMD64", "linux/amd64", id="case-insensitive"),
        pytest.param("linux/riscv64", "linux/riscv64", id="any-named-arch"),
    ],
)
def test_parse_accepts_what_docker_accepts(text: str, expected: str) -> None:
    assert str(Platform.parse(text)) == expected


def test_an_os_alone_means_the_host_architecture() -> None:
    assert Platform.parse("linux") == Platform.host()


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("linux/", id="empty-arch"),
        pytest.param("/amd64", id="empty-os"),
        pytest.param("linux/amd64/v8/extra", id="four-parts"),
        pytest.param("linux/am d64", id="space"),
        pytest.param("plan10", id="unknown-word"),
        pytest.param("windows/amd64", id="not-linux"),
        pytest.param("darwin", id="os-alone-not-linux"),
    ],
)
def test_parse_refuses_with_invalid_platform(text: str) -> None:
    with pytest.raises(InvalidPlatform) as caught:
        Platform.parse(text)
    assert caught.value.code == "invalid_platform" and caught.value.http_status == 400
    assert isinstance(caught.value, InvalidArgument)  # the CLI's exit 2, as for any bad flag
