"""hypeman's official Python SDK (``hypeman``, unmodified) against a real ``serve``.

The SDK is the proof that the REST API is a drop-in for hypeman's images API:
its requests (the ``tags[KEY]=VALUE`` list filter, URL-encoded names, the
credentials object) must be understood, and its response types must validate
(``_strict_response_validation``: an answer that does not fit hypeman's
``Image`` fails the test). The registries want credentials: basic auth and
token auth, on 127.0.0.1 (``support.authregistries``); the credentials a
request borrows must reach them and show up nowhere else.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import hypeman
import pytest
from hypeman.types import Image
from hypeman.types.capabilities_images import CapabilitiesImages
from support.authregistries import USERS, TokenRegistry, basic_registry, token_registry
from support.images import Image as SourceImage
from support.images import make_image, make_layer, push_image
from support.pushed import PushedImage
from support.registry import RegistryServer
from support.service import ServeProcess, serve_process
from support.tar import directory, file

from hypeman_images.oci.spec import Platform

API_KEY = "sdk-api-key-0b7d2e"
BASIC_USER, BASIC_PASSWORD = "bob", "Pw-basic-8e2a6c41d9"
TOKEN_USER = "dora"
TOKEN_PASSWORD = USERS[TOKEN_USER]


@dataclass
class Registries:
    basic: RegistryServer
    token: TokenRegistry
    basic_ref: str  # private image behind basic auth
    token_ref: str  # private image behind token auth, asked for with a password
    bearer_ref: str  # private image behind token auth, asked for with a registry_token


def _image(name: str) -> SourceImage:
    layer = make_layer([directory("etc"), file(f"etc/{name}", f"{name}\n".encode())])
    return make_image([layer], cmd=["/bin/true"], env=[f"IMAGE={name}"], working_dir="/etc")


@pytest.fixture(scope="module")
def registries(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registries]:
    tmp = tmp_path_factory.mktemp("sdk-registries")
    (tmp / "basic").mkdir()
    (tmp / "token").mkdir()
    with (
        basic_registry(tmp / "basic", {BASIC_USER: BASIC_PASSWORD}) as basic,
        token_registry(tmp / "token") as token,
    ):
        with httpx.Client(auth=(BASIC_USER, BASIC_PASSWORD)) as pusher:
            push_image(basic.url, "team/sdk", "v1", _image("basic"), client=pusher)
        token.push("private/sdk", "v1", _image("token"))
        token.push("private/bearer", "v1", _image("bearer"))
        yield Registries(
            basic,
            token,
            f"{basic.host}/team/sdk:v1",
            f"{token.server.host}/private/sdk:v1",
            f"{token.server.host}/private/bearer:v1",
        )


def _serve(tmp: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[ServeProcess]:
    token_file = tmp / "api-key"
    token_file.write_text(API_KEY + "\n")
    token_file.chmod(0o600)
    docker_config = tmp / "docker-config"  # the server's own credentials: none
    docker_config.mkdir(exist_ok=True)
    isolated = {
        "DOCKER_CONFIG": str(docker_config),
        "REGISTRY_AUTH_FILE": str(tmp / "auth.json"),
        **(env or {}),
    }
    data = tmp / "data"
    data.mkdir(exist_ok=True)
    with serve_process(
        data, tmp / "serve.log", "-v", "--token-file", str(token_file), *args, env=isolated
    ) as served:
        yield served


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    yield from _serve(tmp_path_factory.mktemp("sdk-serve"))


@pytest.fixture(scope="module")
def sdk(served: ServeProcess) -> Iterator[hypeman.Hypeman]:
    """The SDK as hypeman's users make it, validating every answer against its types."""
    with hypeman.Hypeman(
        base_url=served.url, api_key=API_KEY, _strict_response_validation=True
    ) as client:
        yield client


def wait_ready(sdk: hypeman.Hypeman, name: str, timeout: float = 60) -> Image:
    deadline = time.monotonic() + timeout
    while True:
        image = sdk.images.get(name)
        if image.status in ("ready", "failed"):
            assert image.status == "ready", image.error
            return image
        assert time.monotonic() < deadline, f"{name} still {image.status}"
        time.sleep(0.05)


def test_create_with_credentials_platform_and_tags_then_get_list_tag_delete(
    sdk: hypeman.Hypeman, registries: Registries
) -> None:
    name = registries.basic_ref
    created = sdk.images.create(
        name=name,
        credentials={"username": BASIC_USER, "password": BASIC_PASSWORD},
        platform="linux/amd64",
        tags={"team": "infra", "env": "ci"},
    )
    assert created.name == name and created.digest.startswith("sha256:")
    assert created.status in ("pending", "pulling", "converting", "ready")
    assert created.tags == {"team": "infra", "env": "ci"}

    ready = wait_ready(sdk, name)
    assert ready.digest == created.digest and ready.size_bytes and ready.size_bytes > 0
    assert ready.platform == "linux/amd64" and ready.cmd == ["/bin/true"]
    assert ready.env == {"IMAGE": "basic"} and ready.working_dir == "/etc"
    assert ready.tags == {"team": "infra", "env": "ci"} and ready.queue_position is None

    # The list filter: every pair must match (the SDK sends tags[team]=infra&...).
    def listed(**tags: str) -> list[str]:
        return [i.name for i in sdk.images.list(tags=tags)] if tags else []

    assert name in listed(team="infra") and name in listed(team="infra", env="ci")
    assert name not in listed(team="infra", env="prod") and name not in listed(team="web")
    assert name in [i.name for i in sdk.images.list()]

    # A local tag in the same repository and one in another: no pull, same digest.
    host = registries.basic.host
    for target in (f"{host}/team/sdk:stable", f"{host}/team/copy:v1"):
        tagged = sdk.images.tag(name, target=target)
        assert (tagged.name, tagged.digest, tagged.status) == (target, ready.digest, "ready")
        assert sdk.images.get(target).size_bytes == ready.size_bytes

    # By image ID: 12 hex digits of the digest. The copy in team/copy makes it two images.
    short = ready.digest[7:19]
    with pytest.raises(hypeman.BadRequestError) as ambiguous:
        sdk.images.get(short)
    assert f"{host}/team/copy@{ready.digest}" in str(ambiguous.value.body)
    sdk.images.delete(f"{host}/team/copy:v1")
    assert sdk.images.get(short).digest == ready.digest
    assert sdk.images.get(ready.digest).digest == ready.digest  # sha256:HEX

    sdk.images.delete(f"{host}/team/sdk:stable")
    with pytest.raises(hypeman.NotFoundError):
        sdk.images.get(f"{host}/team/sdk:stable")
    assert wait_ready(sdk, name).digest == ready.digest  # the other tag keeps the disk


def test_docker_platform_forms_are_normalised(
    sdk: hypeman.Hypeman, multiplatform_ref: PushedImage
) -> None:
    created = sdk.images.create(name=multiplatform_ref.ref, platform="linux/arm64/v8")
    assert created.platform == "linux/arm64"  # as asked, until the config says
    ready = wait_ready(sdk, multiplatform_ref.ref)
    assert ready.platform is not None and ready.platform.startswith("linux/arm64")
    again = sdk.images.create(name=multiplatform_ref.ref, platform="arm64")  # docker's short form
    assert (again.digest, again.status) == (ready.digest, "ready")


def test_errors_are_the_sdk_classes_with_stable_codes(
    sdk: hypeman.Hypeman, served: ServeProcess, registries: Registries
) -> None:
    with pytest.raises(hypeman.NotFoundError) as missing:
        sdk.images.get("127.0.0.1:1/nothing/here:v1")
    assert missing.value.body["code"] == "not_found"  # type: ignore[index]
    assert "hypeman-images" not in missing.value.body["message"]  # type: ignore[index]

    for platform in ("linux/", "windows/amd64", "plan10", "linux/amd64/v8/x"):
        with pytest.raises(hypeman.BadRequestError) as bad:
            sdk.images.create(name=registries.basic_ref, platform=platform)
        assert bad.value.body["code"] == "invalid_platform", platform  # type: ignore[index]

    with pytest.raises(hypeman.BadRequestError) as bad_tags:
        sdk.images.create(name=registries.basic_ref, tags={"bad key!": "x"})
    assert bad_tags.value.body["code"] == "invalid_argument"  # type: ignore[index]

    # The registry refusing credentials is not the API refusing its key.
    with pytest.raises(hypeman.APIStatusError) as refused:
        sdk.images.create(
            name=registries.basic_ref,
            credentials={"username": BASIC_USER, "password": "Pw-wrong-51c0"},
        )
    assert not isinstance(refused.value, hypeman.AuthenticationError)
    assert refused.value.status_code == 424
    assert refused.value.body["code"] == "registry_unauthorized"  # type: ignore[index]
    message = refused.value.body["message"]  # type: ignore[index]
    assert "Pw-wrong-51c0" not in message and "hypeman-images login" not in message
    with pytest.raises(hypeman.APIStatusError) as anonymous:
        sdk.images.create(name=registries.token_ref)  # the server has no credentials
    assert anonymous.value.status_code == 424

    with (
        hypeman.Hypeman(base_url=served.url, api_key="not-the-key") as stranger,
        pytest.raises(hypeman.AuthenticationError) as unauthenticated,
    ):
        stranger.images.list()
    assert unauthenticated.value.body["code"] == "unauthorized"  # type: ignore[index]


def test_capabilities_and_health(sdk: hypeman.Hypeman, served: ServeProcess) -> None:
    assert sdk.health.check().status == "ok"
    # Not strict: hypeman's Capabilities also describes runtimes and networking,
    # which a server without VMs does not have; its images part must fit exactly.
    with hypeman.Hypeman(base_url=served.url, api_key=API_KEY) as lenient:
        capabilities = lenient.capabilities.get()
    host = Platform.host()
    assert capabilities.images.default_platform == str(host)
    assert capabilities.images.platforms == [f"{host.os}/{host.architecture}"]
    assert capabilities.features == ["images"] and capabilities.runtimes == []
    raw = httpx.get(
        f"{served.url}/capabilities", headers={"Authorization": f"Bearer {API_KEY}"}
    ).json()
    assert CapabilitiesImages.model_validate(raw["images"], strict=True) == capabilities.images


def test_tag_or_delete_while_not_ready_is_a_conflict(
    tmp_path: Path, registries: Registries
) -> None:
    # A build parked at mke2fs by the crash tests' hook (build.queue.PauseHook).
    env = {"HYPEMAN_TEST_PAUSE_AT": "mke2fs"}
    for served in _serve(tmp_path, env=env):
        with hypeman.Hypeman(base_url=served.url, api_key=API_KEY, max_retries=0) as sdk:
            name = registries.token_ref
            credentials = {"username": TOKEN_USER, "password": TOKEN_PASSWORD}
            sdk.images.create(name=name, credentials=credentials)
            served.wait_for_output("paused at mke2fs")
            with pytest.raises(hypeman.ConflictError) as conflict:
                sdk.images.tag(name, target=f"{registries.token.server.host}/private/sdk:t")
            assert conflict.value.body["code"] == "conflict"  # type: ignore[index]
            with pytest.raises(hypeman.ConflictError):
                sdk.images.delete(name)
            # Another request for the build in flight, with other credentials: 409 too.
            with pytest.raises(hypeman.ConflictError):
                sdk.images.create(
                    name=name,
                    credentials={**credentials, "username": "alice", "password": USERS["alice"]},
                )
            with pytest.raises(hypeman.NotFoundError):
                sdk.images.tag(f"{name}-nope", target=f"{name}-t")
        served.kill()


def test_borrowed_credentials_reach_the_registries_and_nothing_else(
    sdk: hypeman.Hypeman, served: ServeProcess, registries: Registries
) -> None:
    token = registries.token
    token.tokens.requests.clear()
    created = sdk.images.create(
        name=registries.token_ref,
        credentials={"username": TOKEN_USER, "password": TOKEN_PASSWORD},
    )
    wait_ready(sdk, registries.token_ref)
    assert (TOKEN_USER, "repository:private/sdk:pull") in token.tokens.requests

    # A bearer token is sent to the registry as it is: no token server involved.
    bearer = token.tokens.mint(
        [{"type": "repository", "name": "private/bearer", "actions": ["pull"]}], TOKEN_USER
    )
    token.tokens.requests.clear()
    sdk.images.create(name=registries.bearer_ref, credentials={"registry_token": bearer})
    wait_ready(sdk, registries.bearer_ref)
    assert token.tokens.requests == []

    # Not kept for another request: without credentials the same name is refused.
    with pytest.raises(hypeman.APIStatusError) as refused:
        sdk.images.create(name=registries.token_ref)
    assert refused.value.status_code == 424

    secrets = [BASIC_PASSWORD, TOKEN_PASSWORD, bearer]
    metrics = httpx.get(f"{served.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
    assert metrics.status_code == 200
    leaks = [s for s in secrets for text in (served.output(), metrics.text) if s in text]
    data_dir = served.log.parent / "data"
    for path in data_dir.rglob("*"):
        if path.is_file() and not path.is_symlink():
            content = path.read_bytes()
            leaks += [f"{s} in {path}" for s in secrets if s.encode() in content]
    assert leaks == []
    assert "method=POST path=/images status=202" in served.output()  # the requests were logged
    assert created.name == registries.token_ref
    assert os.environ.get("HYPEMAN_TEST_PAUSE_AT") is None


def test_an_old_metadata_json_with_a_tags_list_still_validates(
    sdk: hypeman.Hypeman, served: ServeProcess, alpine_ref: PushedImage
) -> None:
    """A record of before labels, whose ``tags`` was the list of local tag names."""
    sdk.images.create(name=alpine_ref.ref, tags={"era": "before-labels"})
    digest = wait_ready(sdk, alpine_ref.ref).digest
    data_dir = served.log.parent / "data"
    (metadata,) = data_dir.rglob(f"library/alpine/{digest[7:]}/metadata.json")
    old = json.loads(metadata.read_text())
    del old["borrowed_credentials"]
    old["tags"] = [alpine_ref.tag]
    metadata.write_text(json.dumps(old))

    image = sdk.images.get(alpine_ref.ref)  # strict: hypeman's Image, tags a map
    assert image.tags == {} and image.status == "ready" and image.digest == digest
    extra = {
        "user": "",
        "local_names": [alpine_ref.tag],
        "format": "ext4",
        "source": {"kind": "build", "repository": None, "artifact": None},
    }
    assert image.model_extra == extra  # ours, beside hypeman's fields
    assert alpine_ref.ref in [i.name for i in sdk.images.list()]
    assert sdk.images.list(tags={"era": "before-labels"}) == []
