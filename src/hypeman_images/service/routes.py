"""The API's routes over one :class:`ImageManager`: ``/images``, ``/healthz``, ``/metrics``.

Endpoints are plain ``def``: FastAPI runs them on its threadpool, where the
manager's blocking calls belong. The order routes are added in is the order
of the paths in the OpenAPI document. ``POST /images`` waits on the registry,
so it runs on a pool of its own instead (:mod:`.offload`).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Response
from fastapi.responses import PlainTextResponse

from hypeman_images.build.manager import ImageManager
from hypeman_images.build.metrics import CONTENT_TYPE
from hypeman_images.service.models import (
    CreateImageRequest,
    ErrorModel,
    Health,
    ImageModel,
    image_model,
)
from hypeman_images.service.offload import offload
from hypeman_images.store.formats import DiskFormat


def add_image_routes(app: FastAPI, manager: ImageManager, auth: list[Any]) -> None:
    """``POST``/``GET /images`` and ``GET``/``DELETE /images/{name}``, behind ``auth``."""

    @app.post(
        "/images",
        status_code=202,
        response_model=ImageModel,
        dependencies=auth,
        responses=_responses(400, 401, 404, 429, 502),
        summary="Build an image (returns at once)",
    )
    async def create_image(body: CreateImageRequest) -> ImageModel:
        image = await offload(app).run(manager.create, body.name, format=body.format)
        return image_model(image)

    @app.get(
        "/images",
        response_model=list[ImageModel],
        dependencies=auth,
        responses=_responses(401),
        summary="List images",
    )
    def list_images() -> list[ImageModel]:
        return [image_model(image) for image in manager.list()]

    # {name:path}: names contain '/', ':' and '@'. The value is only ever parsed by
    # parse_reference, whose grammar admits no '..' or empty component.
    @app.get(
        "/images/{name:path}",
        response_model=ImageModel,
        dependencies=auth,
        responses=_responses(400, 401, 404),
        summary="Get an image by tag or digest reference",
    )
    def get_image(name: str, format: DiskFormat | None = None) -> ImageModel:
        return image_model(manager.get(name, format=format))

    @app.delete(
        "/images/{name:path}",
        status_code=204,
        dependencies=auth,
        responses=_responses(400, 401, 404, 409),
        summary="Delete an image by tag (its disk goes with the last tag) or digest",
    )
    def delete_image(name: str) -> Response:
        manager.delete(name)
        return Response(status_code=204)


def add_service_routes(app: FastAPI, manager: ImageManager, auth: list[Any]) -> None:
    """``GET /healthz`` (open to all) and ``GET /metrics`` (behind ``auth``)."""

    @app.get("/healthz", response_model=Health, summary="Liveness")
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
