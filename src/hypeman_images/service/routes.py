"""The API's routes over one :class:`ImageManager`: ``/images``, ``/capabilities``, service.

Endpoints are plain ``def``: FastAPI runs them on its threadpool, where the
manager's blocking calls belong. The order routes are added in is the order
of the paths in the OpenAPI document. ``POST /images`` waits on the registry,
so it runs on a pool of its own instead (:mod:`.offload`).
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import PlainTextResponse

from hypeman_images import __version__
from hypeman_images.build.manager import ImageManager
from hypeman_images.build.metrics import CONTENT_TYPE
from hypeman_images.errors import InvalidArgument
from hypeman_images.oci.spec import Platform
from hypeman_images.service.models import (
    Capabilities,
    CapabilitiesHost,
    CapabilitiesImages,
    CapabilitiesServer,
    CreateImageRequest,
    ErrorModel,
    Health,
    ImageModel,
    TagImageRequest,
    image_model,
)
from hypeman_images.service.offload import offload
from hypeman_images.store.formats import DiskFormat

# hypeman's list filter: ``tags`` as an OpenAPI deepObject, ``?tags[team]=a&tags[env]=b``,
# which is how its SDK encodes a map (hypeman/_qs.py, nested_format "brackets").
_TAG_FILTER = re.compile(r"tags\[(.*)\]")
_TAGS_PARAMETER = {
    "name": "tags",
    "in": "query",
    "required": False,
    "style": "deepObject",
    "explode": True,
    "schema": {"type": "object", "additionalProperties": {"type": "string"}},
    "description": "Only images with every one of these tags: `?tags[team]=a&tags[env]=b`.",
}


def add_image_routes(app: FastAPI, manager: ImageManager, auth: list[Any]) -> None:
    """``/images`` and ``/images/{name}`` (and ``/tag``), behind ``auth``."""

    @app.post(
        "/images",
        status_code=202,
        response_model=ImageModel,
        dependencies=auth,
        responses=_responses(400, 401, 404, 409, 424, 429, 502),
        summary="Pull and convert an image (returns at once)",
        operation_id="createImage",
    )
    async def create_image(body: CreateImageRequest) -> ImageModel:
        credentials = body.credentials.credential() if body.credentials else None
        image = await offload(app).run(
            manager.create,
            body.name,
            platform=body.platform,
            labels=body.tags,
            credentials=credentials,
            format=body.format,
        )
        return image_model(image)

    @app.get(
        "/images",
        response_model=list[ImageModel],
        dependencies=auth,
        responses=_responses(400, 401),
        summary="List images",
        operation_id="listImages",
        openapi_extra={"parameters": [_TAGS_PARAMETER]},
    )
    def list_images(request: Request) -> list[ImageModel]:
        labels = tag_filter(request.query_params.multi_items())
        return [image_model(image) for image in manager.list(labels)]

    # {name:path}: names contain '/', ':' and '@'. The value is only ever parsed by
    # parse_reference, whose grammar admits no '..' or empty component, or as an ID.
    @app.get(
        "/images/{name:path}",
        response_model=ImageModel,
        dependencies=auth,
        responses=_responses(400, 401, 404),
        summary="Get an image by tag or digest reference, or image ID",
        operation_id="getImage",
    )
    def get_image(name: str, format: DiskFormat | None = None) -> ImageModel:
        return image_model(manager.get(name, format=format))

    @app.delete(
        "/images/{name:path}",
        status_code=204,
        dependencies=auth,
        responses=_responses(400, 401, 404, 409),
        summary="Delete an image by tag (its disk goes with the last tag), digest or ID",
        operation_id="deleteImage",
    )
    def delete_image(name: str) -> Response:
        manager.delete(name)
        return Response(status_code=204)

    @app.post(
        "/images/{name:path}/tag",
        response_model=ImageModel,
        dependencies=auth,
        responses=_responses(400, 401, 404, 409),
        summary="Create or move a local tag to a ready image, without pulling",
        operation_id="tagImage",
    )
    def tag_image(name: str, body: TagImageRequest) -> ImageModel:
        return image_model(manager.tag(name, body.target))


def tag_filter(query: list[tuple[str, str]]) -> dict[str, str]:
    """The ``tags[KEY]=VALUE`` pairs of a query string; other parameters are not ours."""
    labels: dict[str, str] = {}
    for name, value in query:
        match = _TAG_FILTER.fullmatch(name)
        if match is None:
            if name == "tags":
                raise InvalidArgument("filter by tags as tags[KEY]=VALUE, e.g. ?tags[team]=a")
            continue
        key = match[1]
        if key in labels and labels[key] != value:
            raise InvalidArgument(f"tag {key!r} is asked for with two values")
        labels[key] = value
    return labels


def add_service_routes(app: FastAPI, manager: ImageManager, auth: list[Any]) -> None:
    """``/capabilities`` and ``/metrics`` (behind ``auth``), ``/healthz`` (open to all)."""

    @app.get(
        "/capabilities",
        response_model=Capabilities,
        dependencies=auth,
        responses=_responses(401),
        summary="What this server can do: the images part of hypeman's capabilities",
        operation_id="getCapabilities",
    )
    def capabilities() -> Capabilities:
        host = Platform.host()
        return Capabilities(
            server=CapabilitiesServer(version=__version__, api_version=app.version),
            host=CapabilitiesHost(os=host.os, arch=host.architecture),
            images=CapabilitiesImages(
                default_platform=str(manager.options.platform),
                platforms=[f"{host.os}/{host.architecture}"],
            ),
            features=["images"],
            runtimes=[],
        )

    @app.get("/healthz", response_model=Health, summary="Liveness")
    @app.get(
        "/health",
        response_model=Health,
        summary="Liveness (hypeman's path)",
        operation_id="getHealth",
    )
    def healthz() -> Health:
        return Health(status="ok")

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        dependencies=auth,
        responses=_responses(401),
        summary="Prometheus metrics",
    )
    def metrics() -> Response:
        text = manager.metrics.render(manager.gauges())
        return Response(text, media_type=CONTENT_TYPE)


def _responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorModel} for status in statuses}
