"""The API's own bearer token (``serve --token-file``), not a registry's credentials.

With a token configured, every path but ``/healthz`` and ``/health`` needs
it, the API's documents (``/openapi.json``, ``/docs``, ``/redoc``) and unknown
paths included. :class:`~.limits.RequestGuard` checks it from the request head,
before any body is read; the routes also depend on :func:`bearer_auth`'s
check, which declares the scheme in the OpenAPI document. Both compare in
constant time (:func:`bearer_matches`); a missing or wrong token is a 401
with ``WWW-Authenticate``.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

# A stateless declaration (it only reads the header); module level so that FastAPI
# can resolve the annotation that names it.
_BEARER = HTTPBearer(auto_error=False, description="The token from `serve --token-file`")


class Unauthenticated(Exception):
    """The API's own bearer token is missing or wrong (not a registry's refusal)."""


def bearer_auth(token: str | None) -> list[Any]:
    """The route dependencies that check ``token``.

    Without a token every request passes, and the bearer scheme is still
    declared: the OpenAPI document is the same either way.
    """
    return [Depends(_authorizer(token.encode() if token is not None else None))]


def _authorizer(expected: bytes | None) -> Callable[..., None]:
    def authorize(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
    ) -> None:
        if expected is None:
            return
        given = credentials.credentials.encode() if credentials is not None else b""
        if not hmac.compare_digest(given, expected):
            raise Unauthenticated()

    return authorize
