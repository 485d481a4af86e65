"""The API's own bearer token (``serve --token-file``), not a registry's credentials.

With a token configured, every route but ``/healthz``, ``/health`` and ``/openapi.json``
depends on :func:`bearer_auth`'s check, which compares in constant time
(``hmac.compare_digest``) and raises :class:`Unauthenticated` on a missing or
wrong token; the app answers that with 401 and ``WWW-Authenticate``.
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
