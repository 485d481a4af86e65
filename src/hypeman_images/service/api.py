"""The REST API: hypeman's ``/images`` resource over one :class:`ImageManager`.

::

    POST   /images             {"name", "platform"?, "tags"?, "credentials"?} → 202 Image
    GET    /images             ?tags[KEY]=VALUE… → 200 [Image]
    GET    /images/{name}      → 200 Image     name URL-encoded: reference or image ID
    DELETE /images/{name}      → 204           409 while it builds
    POST   /images/{name}/tag  {"target"} → 200 Image   409 until it is ready
    GET    /capabilities       → 200 the images part of hypeman's capabilities
    GET    /healthz, /health   → 200 {"status": "ok"}
    GET    /metrics            → Prometheus text
    GET    /openapi.json       → this API's OpenAPI document (kept in docs/openapi.json)

Errors are ``{"code", "message"}`` (and ``details`` for a malformed body)
with the status the exception class names (:mod:`hypeman_images.errors`);
this is the one place that maps them, and it gives the API's advice
(``api_message``), never the CLI's. With a token configured, every path but
``/healthz`` and ``/health`` wants ``Authorization: Bearer`` (:mod:`.auth`),
checked with the ``Host``, the body's size and its deadline before the body
is read (:mod:`.limits`). The routes are in :mod:`.routes`, the bodies in
:mod:`.models`; registry-bound calls run on a pool of their own (:mod:`.offload`).

``python -m hypeman_images.service.api`` prints the OpenAPI document.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hypeman_images import __version__
from hypeman_images.build.manager import ImageManager
from hypeman_images.errors import HypemanError, RateLimited
from hypeman_images.service.auth import Unauthenticated, bearer_auth
from hypeman_images.service.limits import RequestGuard
from hypeman_images.service.offload import Offload
from hypeman_images.service.routes import add_image_routes, add_service_routes
from hypeman_images.service.settings import ServiceLimits
from hypeman_images.service.tokens import WWW_AUTHENTICATE

DESCRIPTION = (
    "Converts OCI images into bootable ext4 disks for microVMs: hypeman's images API. "
    "`POST /images` resolves the name to a digest and queues one build per digest; poll "
    "`GET /images/{name}` until `status` is `ready` or `failed`. A registry refusing "
    "credentials is 424 `registry_unauthorized`; 401 is only ever this API's own token."
)


def create_app(
    manager: ImageManager,
    *,
    token: str | None = None,
    limits: ServiceLimits | None = None,
    hosts: frozenset[str] | None = None,
) -> FastAPI:
    """The FastAPI app serving ``manager``.

    ``token`` turns on bearer authentication; ``limits`` bound request bodies
    (default :class:`ServiceLimits`); ``hosts`` is the ``Host`` allow-list
    (None: any Host, as for a caller that checks it itself).
    """
    pool = Offload()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        pool.close()

    app = FastAPI(
        title="hypeman-images", version=__version__, description=DESCRIPTION, lifespan=lifespan
    )
    app.state.offload = pool
    app.add_middleware(RequestGuard, token=token, limits=limits or ServiceLimits(), hosts=hosts)
    auth = bearer_auth(token)
    _add_error_handlers(app)
    add_image_routes(app, manager, auth)
    add_service_routes(app, manager, auth)

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


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as ``{"code", "message"}``, with the status its class names."""

    @app.exception_handler(HypemanError)
    def hypeman_error(request: Request, exc: HypemanError) -> Response:
        headers = None
        if isinstance(exc, RateLimited) and exc.retry_after is not None:
            headers = {"Retry-After": str(int(exc.retry_after))}
        return _error(exc.http_status, exc.code, exc.api_message, headers)  # type: ignore[no-any-return]

    @app.exception_handler(Unauthenticated)
    def unauthenticated(request: Request, exc: Unauthenticated) -> Response:
        return _error(  # type: ignore[no-any-return]
            401,
            "unauthorized",
            "missing or invalid bearer token",
            {"WWW-Authenticate": WWW_AUTHENTICATE},
        )

    @app.exception_handler(RequestValidationError)
    def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        # Each problem by where and what, never the value: it may be a password.
        details = [
            {"code": str(e["type"]), "message": f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"}
            for e in exc.errors()
        ]
        message = "; ".join(d["message"] for d in details) or "invalid request"
        return _error(400, "invalid_request", message, details=details)  # type: ignore[no-any-return]

    @app.exception_handler(StarletteHTTPException)
    def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail))  # type: ignore[no-any-return]


def _error(
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    *,
    details: list[dict[str, str]] | None = None,
) -> Any:
    body: dict[str, Any] = {"code": code, "message": message}
    if details:
        body["details"] = details
    return JSONResponse(body, status_code=status, headers=headers)


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
