"""The REST API: hypeman's ``/images`` resource over one :class:`ImageManager`.

::

    POST   /images          {"name": "alpine:3.20"} → 202 Image (pending, or ready if built)
    GET    /images          → 200 [Image]
    GET    /images/{name}   → 200 Image     name URL-encoded: tag or digest reference
    DELETE /images/{name}   → 204           409 while it builds
    GET    /healthz         → 200 {"status": "ok"}
    GET    /metrics         → Prometheus text
    GET    /openapi.json    → this API's OpenAPI document (kept in docs/openapi.json)

Errors are ``{"code": ..., "message": ...}`` with the status the exception
class names (:mod:`hypeman_images.errors`). With a token configured, every
route but ``/healthz`` and ``/openapi.json`` wants ``Authorization: Bearer``.
Endpoints are plain ``def``: FastAPI runs them on its threadpool, where the
manager's blocking calls belong.

``python -m hypeman_images.service.api`` prints the OpenAPI document.
"""

from __future__ import annotations

import hmac
import json
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from hypeman_images import __version__
from hypeman_images.build.image import Image
from hypeman_images.build.manager import ImageManager
from hypeman_images.build.metrics import CONTENT_TYPE
from hypeman_images.errors import HypemanError, RateLimited
from hypeman_images.store.images import ImageStatus

DESCRIPTION = (
    "Converts OCI images into bootable ext4 disks for microVMs. `POST /images` resolves "
    "the name to a digest and queues one build per digest; poll `GET /images/{name}` "
    "until `status` is `ready` or `failed`."
)


# A stateless declaration (it only reads the header); module level so that FastAPI
# can resolve the annotation that names it.
_BEARER = HTTPBearer(auto_error=False, description="The token from `serve --token-file`")


class CreateImageRequest(BaseModel):
    """Body of ``POST /images``."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Image reference, e.g. `alpine:3.20` or `repo@sha256:…`")


class ImageModel(BaseModel):
    """hypeman's ``Image``."""

    name: str = Field(description="Normalised reference, e.g. docker.io/library/alpine:3.20")
    digest: str = Field(description="Platform manifest digest (sha256:…)")
    status: ImageStatus
    queue_position: int | None = Field(description="1-based place in the queue while pending")
    error: str | None = Field(description="Why the build failed (status failed)")
    size_bytes: int | None = Field(description="Size of rootfs.ext4 (status ready)")
    entrypoint: list[str] | None
    cmd: list[str] | None
    env: dict[str, str]
    working_dir: str
    user: str
    created_at: str = Field(description="RFC 3339 UTC")
    tags: list[str] = Field(description="Local tags that point at this digest")
    platform: str | None = Field(description="os/arch[/variant] of the image config")


class ErrorModel(BaseModel):
    """Every error response."""

    code: str = Field(description="Stable machine-readable error name, e.g. not_found")
    message: str


class Health(BaseModel):
    """Body of ``GET /healthz``."""

    status: str


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Any:
    return JSONResponse({"code": code, "message": message}, status_code=status, headers=headers)


def _responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorModel} for status in statuses}


class _Unauthenticated(Exception):
    """The API's own bearer token is missing or wrong (not a registry's refusal)."""


def create_app(manager: ImageManager, *, token: str | None = None) -> FastAPI:
    """The FastAPI app serving ``manager``; ``token`` turns on bearer authentication."""
    app = FastAPI(title="hypeman-images", version=__version__, description=DESCRIPTION)
    expected = token.encode() if token is not None else None

    def authorize(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
    ) -> None:
        if expected is None:
            return
        given = credentials.credentials.encode() if credentials is not None else b""
        if not hmac.compare_digest(given, expected):
            raise _Unauthenticated()

    auth = [Depends(authorize)]

    @app.exception_handler(HypemanError)
    def hypeman_error(request: Request, exc: HypemanError) -> Response:
        headers = None
        if isinstance(exc, RateLimited) and exc.retry_after is not None:
            headers = {"Retry-After": str(int(exc.retry_after))}
        return _error(exc.http_status, exc.code, exc.message, headers)  # type: ignore[no-any-return]

    @app.exception_handler(_Unauthenticated)
    def unauthenticated(request: Request, exc: _Unauthenticated) -> Response:
        return _error(  # type: ignore[no-any-return]
            401,
            "unauthorized",
            "missing or invalid bearer token",
            {"WWW-Authenticate": 'Bearer realm="hypeman-images"'},
        )

    @app.exception_handler(RequestValidationError)
    def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        return _error(400, "invalid_request", problems or "invalid request")  # type: ignore[no-any-return]

    @app.exception_handler(StarletteHTTPException)
    def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail))  # type: ignore[no-any-return]

    @app.post(
        "/images",
        status_code=202,
        response_model=ImageModel,
        dependencies=auth,
        responses=_responses(400, 401, 404, 429, 502),
        summary="Build an image (returns at once)",
    )
    def create_image(body: CreateImageRequest) -> ImageModel:
        return _model(manager.create(body.name))

    @app.get(
        "/images",
        response_model=list[ImageModel],
        dependencies=auth,
        responses=_responses(401),
        summary="List images",
    )
    def list_images() -> list[ImageModel]:
        return [_model(image) for image in manager.list()]

    # {name:path}: names contain '/', ':' and '@'. The value is only ever parsed by
    # parse_reference, whose grammar admits no '..' or empty component.
    @app.get(
        "/images/{name:path}",
        response_model=ImageModel,
        dependencies=auth,
        responses=_responses(400, 401, 404),
        summary="Get an image by tag or digest reference",
    )
    def get_image(name: str) -> ImageModel:
        return _model(manager.get(name))

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

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _without_422(
                get_openapi(
                    title=app.title,
                    version=app.version,
                    description=app.description,
                    routes=app.routes,
                )
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _model(image: Image) -> ImageModel:
    return ImageModel.model_validate(image.to_json())


def _without_422(doc: dict[str, Any]) -> dict[str, Any]:
    """FastAPI documents body validation as 422; this API answers 400 (hypeman's choice)."""
    for path in doc.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    schemas = doc.get("components", {}).get("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    return doc


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document as served (for docs/openapi.json)."""
    with tempfile.TemporaryDirectory() as tmp, ImageManager(Path(tmp)) as manager:
        return create_app(manager).openapi()


if __name__ == "__main__":
    json.dump(openapi_document(), sys.stdout, indent=2)
    sys.stdout.write("\n")
