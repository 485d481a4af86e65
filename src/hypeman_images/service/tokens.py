"""The API's bearer token, checked without FastAPI.

The connection limits (:mod:`hypeman_images.service.limits`) check it before
any route runs, and the CLI's parser imports those limits' defaults on every
command: this module keeps both free of FastAPI's import cost.
"""

from __future__ import annotations

import hmac

WWW_AUTHENTICATE = 'Bearer realm="hypeman-images"'


def bearer_matches(expected: bytes, authorization: str | None) -> bool:
    """True if an ``Authorization`` header value is ``Bearer <expected>`` (constant time)."""
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        given = ""
    return hmac.compare_digest(given.encode(), expected)


__all__ = ["WWW_AUTHENTICATE", "bearer_matches"]
